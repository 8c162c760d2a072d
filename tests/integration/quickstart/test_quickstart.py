"""The quickstart pipeline at reduced size: every stage's output exists and is valid, the
exported model loads in transformers and matches the Megatron model's logits."""

import io
import json

import pytest
import torch

from megatron.sft.quickstart.pipeline import Demo, DemoConfig
from megatron.sft.quickstart.task import TaskConfig, make_task


def test_task_heldout_prompts_are_unseen():
    records, heldout = make_task(TaskConfig(train_conversations=500, heldout_prompts=50))
    seen = {m["content"] for r in records for m in r["messages"] if m["role"] == "user"}
    assert len(heldout) == 50 and not {p for p, _ in heldout} & seen
    assert all(p == "Repeat: " + a for p, a in heldout)


@pytest.mark.xdist_group("multiprocess")
def test_reduced_quickstart_pipeline(tmp_path):
    demo = Demo(DemoConfig(workdir=tmp_path / "demo", train_iters=6, eval_interval=3,
                           log_interval=3, task=TaskConfig(train_conversations=300,
                                                           heldout_prompts=4),
                           lora_rank=4, lora_train_iters=3),
                say=lambda m: None, progress=io.StringIO())
    r = demo.run()
    # The training stages talked while they ran: a line every log_interval (3) iterations.
    progress = demo.progress.getvalue().splitlines()
    answers = [line for line in progress if line.startswith("    iteration ")]
    assert [line.split()[:2] for line in progress if line not in answers] == [
        ["SFT", "3/6"], ["SFT", "6/6"], ["LoRA", "3/3"]], progress
    # ... and at each evaluation (3, 6) said what it answers to the first held-out prompt
    prompt = make_task(TaskConfig(train_conversations=300, heldout_prompts=4))[1][0][0]
    assert [a.split(":")[0] for a in answers] == ["    iteration 3", "    iteration 6"]
    assert all(a.split(": ", 1)[1].startswith(repr(prompt) + " -> ") for a in answers)
    assert list(r["eval_generations"]["at"]) == [3, 6]
    paths = {k: tmp_path / "demo" / v.split("/demo/")[-1] for k, v in r["paths"].items()}
    # Every stage ran and left valid output.
    names = [s["name"] for s in r["stages"]]
    assert names[names.index("loss curve") + 1:] == [
        "LoRA: make + tokenize data", "LoRA: accuracy before", "LoRA: training",
        "LoRA: export merged -> HF", "LoRA: accuracy after"]
    assert (paths["tokenizer"] / "tokenizer.json").exists()
    assert (paths["ckpt"] / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (paths["run"] / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    log = [json.loads(line) for line in paths["log"].read_text().splitlines()]
    assert [x["iteration"] for x in log] == list(range(1, 7))
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = next(paths["data"].parent.glob("Tokenized-*_text_document.idx"))
    assert len(IndexedDataset(str(prefix)[: -len(".idx")])) == 300
    # Exported model: loads in transformers and matches megatron-core's logits from the run.
    assert r["parity_converted"] <= 1e-4
    assert r["parity_exported"] <= 1e-4
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(paths["export"])
    assert AutoTokenizer.from_pretrained(paths["export"]).chat_template
    assert 0.0 <= r["accuracy_after"] <= 1.0 and r["loss_end"] < r["loss_start"]
    # The LoRA stage: a LoRA run (adapters only, naming the SFT run as its base) on the second
    # task, exported merged into a model transformers loads and generates with.
    from megatron.sft.lora.run_format import read_lora_info

    info = read_lora_info(paths["lora_run"] / "iter_0000003")
    assert info.settings.rank == 4 and info.base_checkpoint == str(paths["run"].resolve())
    assert info.base_iteration == 6
    assert 0.0 <= r["lora_accuracy_before"] <= 1.0 and 0.0 <= r["lora_accuracy_after"] <= 1.0
    assert r["lora_loss_end"] < r["lora_loss_start"]
    lora_model = AutoModelForCausalLM.from_pretrained(paths["lora_export"])
    sft_model = AutoModelForCausalLM.from_pretrained(paths["export"])
    lora_sd, sft_sd = lora_model.state_dict(), sft_model.state_dict()
    changed = {k for k in sft_sd if not torch.equal(sft_sd[k], lora_sd[k])}
    # Adapters change exactly the targeted projections; embeddings and norms stay the base's.
    assert changed and all(k.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj",
                                                  "gate_proj", "up_proj", "down_proj"}
                           for k in changed), sorted(changed)[:5]
