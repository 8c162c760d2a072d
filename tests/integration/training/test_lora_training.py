"""LoRA on megatron-core under gloo, against transformers + peft:

- iteration-1 loss with non-zero adapters equals peft's on the same samples (TP1, TP2, PP2),
  with the adapters carried over by our PEFT exporter;
- the merged export and the PEFT adapter give the same logits in transformers;
- only adapters train (base bit-identical, no grad buffers or optimizer state for it), and the
  curve does not depend on TP/PP/VPP/DP or activation recompute;
- checkpoints hold adapters only, resume is exact.
"""

import json
from pathlib import Path

import pytest
import torch

from sft_testing import run_batch, run_tool

LORA = dict(lora_rank=4, lora_alpha=8.0, transformer_impl="local")


def _config(ckpt, data, **overrides):
    cfg = dict(load=ckpt, data_path=data, seq_length=128, micro_batch_size=2,
               global_batch_size=8, train_iters=3, lr=1e-2, lr_decay_style="constant",
               no_progress=True, split="90,10,0", clip_grad=0.0, attention_backend="sdpa", **LORA)
    cfg.update(overrides)
    return cfg


PEFT_CASES = [(1, 1, True, None), (2, 1, True, None), (1, 2, True, None),
              (2, 1, False, "linear_fc2,linear_qkv")]  # unpacked rows, a subset of targets
LAYOUT_RUNS = ["tp1", "tp2", "pp2vpp2", "dp2", "recompute", "bf16"]
RESUME = dict(train_iters=4, lr_decay_style="cosine", lr_warmup_iters=1,
              tensor_model_parallel_size=2, lr=3e-3)


def _peft_name(tp, pp, packing, targets):
    return f"peft-tp{tp}pp{pp}-{'packed' if packing else 'unpacked'}-{targets or 'all'}"


def _scenarios(world, sft_assets, checkpoints, root):
    """Every LoRA run of this module on ``world`` ranks, by name (one launch per world)."""
    data, ck = sft_assets["data"], checkpoints
    out = {}
    for tp, pp, packing, targets in PEFT_CASES:
        if tp * pp == world:
            name = _peft_name(tp, pp, packing, targets)
            out[name] = {"kind": "lora", "mode": "peft_loss", "hf": str(sft_assets["hf"]),
                         "b_std": 0.05, "config": _config(
                             ck[(tp, pp)], data, packing=packing, save=str(root / name),
                             tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             **({"lora_target_modules": targets} if targets else {}))}
    train = {
        # 1 rank
        "tp1": (1, _config(ck[(1, 1)], data)),
        # Recompute wraps each layer in an autograd Function: with a frozen embedding its input
        # would not require grad and the adapters would silently get none.
        "recompute": (1, _config(ck[(1, 1)], data, recompute_granularity="full")),
        # bf16 weights and adapters, fp32 master copies of the adapters only
        "bf16": (1, _config(ck[(1, 1)], data, bf16=True)),
        "full": (1, _config(ck[(1, 1)], data, lora_rank=0, lr=1e-4)),
        # 2 ranks
        "tp2": (2, _config(ck[(2, 1)], data, tensor_model_parallel_size=2)),
        "pp2vpp2": (2, _config(ck["vpp"], data, pipeline_model_parallel_size=2,  # interleaved
                               num_layers_per_virtual_pipeline_stage=1)),
        "dp2": (2, _config(ck[(1, 1)], data, use_distributed_optimizer=True,
                           micro_batch_size=1)),
    }
    for name, (n, config) in train.items():
        if n == world:
            out[name] = {"kind": "lora", "mode": "train", "config": config}
    if world == 2:
        # One run saves at 2 and goes on to 4; a second is pointed back at 2 (as a user rolls
        # back), redoes 3 exactly, and saves and exits there (--exit-interval 3).
        save = root / "run"
        out["resume-straight"] = {"kind": "lora", "mode": "train", "config": _config(
            ck[(2, 1)], data, save=str(save), save_interval=2, **RESUME)}
        out["resume-resumed"] = {"kind": "lora", "mode": "train", "config": _config(
            str(save), data, save=str(root / "run2"), exit_interval=3, **RESUME),
            "before": [{"set_latest": [str(save), 2]}]}
    return out


def _batch(world, sft_assets, checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lora-world{world}")
    return run_batch(root, world, _scenarios(world, sft_assets, checkpoints, root))


@pytest.fixture(scope="module")
def world1(sft_assets, checkpoints, tmp_path_factory):
    return _batch(1, sft_assets, checkpoints, tmp_path_factory)


@pytest.fixture(scope="module")
def world2(sft_assets, checkpoints, tmp_path_factory):
    return _batch(2, sft_assets, checkpoints, tmp_path_factory)


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("tp, pp, packing, targets", PEFT_CASES)
def test_lora_loss_equals_peft_and_exports_agree(tp, pp, packing, targets, sft_assets, request,
                                                 tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
    from megatron.sft.lora.merge import open_checkpoint

    batch = request.getfixturevalue(f"world{tp * pp}")
    name = _peft_name(tp, pp, packing, targets)
    r, save = batch[name], batch.root / name
    # 4 layers x 7 HF modules (4 for q/k/v + down) x (A, B), every one loaded by peft
    modules = 4 if targets else 7
    assert r["adapter_tensors"] == 4 * modules * 2
    assert not r["peft_missing"] and not r["peft_unexpected"]
    assert r["megatron_tokens"] == r["hf_tokens"] > 0
    assert abs(r["megatron"] - r["hf"]) <= 1e-5 * r["hf"], r

    # The adapters are not a no-op: the base alone gives a different loss.
    base = AutoModelForCausalLM.from_pretrained(sft_assets["hf"], dtype=torch.float32)
    tokens = torch.arange(3, 40).unsqueeze(0)
    assert (_logits(base, tokens) - _logits(PeftModel.from_pretrained(
        base, r["adapter_dir"]), tokens)).abs().max() > 1e-3

    # merge_and_export's path (W + alpha/r B A per TP shard, then the usual merge) and the PEFT
    # adapter loaded by peft.PeftModel.from_pretrained (our adapter_config.json) agree.
    merged_dir = export_megatron_to_hf(open_checkpoint(save), tmp_path / "merged", sft_assets["hf"],
                                       ExportOptions(progress=False))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(sft_assets["hf"], dtype=torch.float32),
        r["adapter_dir"])
    diff = (_logits(merged, tokens) - _logits(peft_model, tokens)).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.xdist_group("multiprocess")
def test_only_adapters_train_and_curve_is_independent_of_layout_and_recompute(world1, world2):
    runs = {name: (world1 if name in ("tp1", "recompute", "bf16") else world2)[name]
            for name in LAYOUT_RUNS}
    full = world1["full"]
    # hidden 64, ffn 128, 4 heads/2 KV of 16: per layer r x (in + out) for qkv, proj, fc1, fc2
    per_layer = 4 * ((64 + 128) + (64 + 64) + (64 + 256) + (128 + 64))
    for name, run in runs.items():
        assert run["base_unchanged"], name
        assert run["adapters_buffered"], name
        assert run["params_with_grad_buffer"] and all(
            ".lora." in n for n in run["params_with_grad_buffer"]), name
        if name in ("tp1", "dp2", "recompute", "bf16"):  # (TP2 counts replicated halves twice)
            assert run["optimizer_numel"] == 4 * per_layer, (name, run["optimizer_numel"])
    # At B = 0 the model is the base: LoRA's first loss is full fine-tuning's first loss.
    assert runs["tp1"]["history"][0]["loss"] == pytest.approx(full["history"][0]["loss"],
                                                              rel=1e-6)
    ref = runs["tp1"]["history"]
    assert ref[-1]["loss"] < ref[0]["loss"]
    for name, run in runs.items():
        tolerance = 3e-2 if name == "bf16" else 1e-5  # bf16: ~3 significant digits
        for a, b in zip(ref, run["history"]):
            assert abs(a["loss"] - b["loss"]) <= tolerance * a["loss"], (name, a, b)
    assert not full["base_unchanged"]
    # Adam keeps two fp32 moments per trainable element.
    assert runs["tp1"]["optimizer_state_bytes"] == 2 * 4 * runs["tp1"]["optimizer_numel"]
    # The tiny model has ~190k parameters, 13k of them LoRA adapters at r = 4.
    assert full["optimizer_state_bytes"] == 2 * 4 * full["optimizer_numel"]
    assert full["optimizer_numel"] > 10 * runs["tp1"]["optimizer_numel"]
    print(f"optimizer state bytes: full {full['optimizer_state_bytes']}, "
          f"LoRA r4 {runs['tp1']['optimizer_state_bytes']}")


@pytest.mark.xdist_group("multiprocess")
def test_lora_checkpoint_holds_adapters_and_resume_is_exact(sft_assets, checkpoints, world2,
                                                            tmp_path):
    from megatron.sft.bridge.checkpoint_io import (iteration_dir, load_rank_state,
                                                     read_latest_iteration, read_metadata)
    from megatron.sft.lora.run_format import read_lora_info

    base = checkpoints[(2, 1)]
    save = world2.root / "run"
    straight = world2["resume-straight"]["history"]
    assert [h["iteration"] for h in straight] == [1, 2, 3, 4]
    it2 = save / "iter_0000002"
    info = read_lora_info(it2)
    assert info.base_checkpoint == str(Path(base).resolve())
    assert info.base_iteration == read_latest_iteration(Path(base))
    state = load_rank_state(it2, read_metadata(it2).layout, 1, 0)
    assert state["model"] and all(".lora." in k for k in state["model"])
    base_state = load_rank_state(iteration_dir(Path(base)), read_metadata(it2).layout, 1, 0)

    def nbytes(sd):
        return sum(t.numel() * t.element_size() for t in sd.values() if torch.is_tensor(t))

    assert nbytes(state["model"]) < nbytes(base_state["model"]) / 5

    resumed = world2["resume-resumed"]["history"]
    assert [h["iteration"] for h in resumed] == [3]
    assert read_latest_iteration(world2.root / "run2") == 3
    assert read_lora_info(world2.root / "run2" / "iter_0000003").base_checkpoint == \
        info.base_checkpoint  # a resumed run still names the original base
    a, b = straight[2], resumed[0]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0), (a, b)
    assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)

    # What a user meets with that run: a PEFT adapter from the launcher, and clear refusals.
    r = run_tool("scripts/checkpoints/export_lora_adapter.sh", str(save), str(sft_assets["hf"]),
                 str(tmp_path / "adapter"))
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    r = run_tool("scripts/checkpoints/export_lora_adapter.sh", base, str(sft_assets["hf"]),
                 str(tmp_path / "adapter2"))
    assert r.returncode == 2 and "not a LoRA run (train with --lora-rank R)" in r.stderr
    cli = ["--load", str(save), "--data-path", sft_assets["data"], "--train-iters", "5",
           "--seq-length", "128", "--global-batch-size", "8", "--no-progress",
           "--transformer-impl", "local"]
    r = run_tool("tools/train_sft.py", *cli)
    assert r.returncode == 2 and "is a LoRA run" in r.stderr and "--lora-rank 4" in r.stderr, \
        r.stderr[-2000:]
    r = run_tool("tools/train_sft.py", *cli, "--lora-rank", "8")
    assert r.returncode == 2 and "holds LoRA adapters with rank 4" in r.stderr, r.stderr[-2000:]
