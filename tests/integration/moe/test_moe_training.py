"""Mixture-of-Experts SFT on megatron-core under gloo, four runs in one 4-rank launch:

- the iteration-1 language-model loss equals transformers' masked loss (packed rows) at EP1 and
  at EP2;
- the per-layer auxiliary loss the run logs equals megatron-core's formula computed by hand
  from transformers' router logits of the same tokens (padding excluded);
- the loss curve at TP2 x EP2 (with sequence parallelism) equals TP1 x EP1's within 1e-4 over
  5 iterations;
- an EP2 run (distributed optimizer, grouped_mm experts) resumed from its iteration-2 save,
  under the sequential experts implementation, redoes iterations 3 and 4 exactly.
"""

import json
import math
from pathlib import Path

import pytest

from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.bridge.random_hf_model import make_random_hf_model
from megatron.sft.runtime.layout import ParallelLayout
from sft_testing import run_torchrun

WORKER = Path(__file__).with_name("moe_train_worker.py")
ARCH = "Qwen3MoeForCausalLM"  # 8 experts, 3 MoE layers and a dense one


@pytest.fixture(scope="module")
def moe_assets(sft_assets, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("moe_sft")
    vocab = len(AutoTokenizer.from_pretrained(sft_assets["tokenizer"]))
    hf = make_random_hf_model(ARCH, root / "hf", seed=5, overrides=dict(vocab_size=vocab))
    ckpts = {}
    for name, layout in {"ep1": ParallelLayout(), "ep2": ParallelLayout(1, 1, ep=2),
                         "tp2ep2": ParallelLayout(2, 1, ep=2)}.items():
        ckpts[name] = str(root / name)
        convert_hf_to_megatron(hf, ckpts[name], ConvertOptions(layout=layout, progress=False))
    return {"hf": str(hf), "ckpts": ckpts, "data": sft_assets["data"]}


def _run(ckpt, data, **overrides):
    cfg = dict(load=ckpt, data_path=data, seq_length=128, micro_batch_size=2,
               global_batch_size=8, train_iters=5, lr=1e-3, lr_decay_style="constant",
               no_progress=True, split="90,10,0", clip_grad=0.0, moe_aux_loss_coeff=0.01)
    cfg.update(overrides)
    return cfg


@pytest.mark.xdist_group("multiprocess")
def test_moe_sft_loss_aux_loss_layouts_and_resume(moe_assets, tmp_path):
    c, data = moe_assets["ckpts"], moe_assets["data"]
    save = tmp_path / "run"
    runs = {
        "ep1": _run(c["ep1"], data),
        "tp2ep2": _run(c["tp2ep2"], data, tensor_model_parallel_size=2,
                       expert_model_parallel_size=2, sequence_parallel=True),
        "aux_ep2": _run(c["ep2"], data, expert_model_parallel_size=2, train_iters=4,
                        lr_decay_style="cosine", lr_warmup_iters=1, save=str(save),
                        save_interval=2, use_distributed_optimizer=True,
                        moe_experts_impl="grouped_mm"),
        "resumed": _run(str(save), data, expert_model_parallel_size=2, train_iters=4,
                        lr_decay_style="cosine", lr_warmup_iters=1,
                        save=str(tmp_path / "run2"), use_distributed_optimizer=True,
                        moe_experts_impl="sequential",
                        # from the save at iteration 2: the tracker pointed back at it
                        rewind_to=2),
    }
    spec = {"out": str(tmp_path / "out.json"), "hf": moe_assets["hf"], "runs": runs}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = run_torchrun(4, WORKER, str(tmp_path / "spec.json"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r = json.loads((tmp_path / "out.json").read_text())

    # iteration-1 LM loss == transformers' masked loss, at EP1 and EP2 (TP1 and TP2)
    for name in ("ep1", "tp2ep2", "aux_ep2"):
        first = r[name][0]
        assert first["loss_tokens"] == r["hf_tokens"] > 0
        assert abs(first["loss"] - r["hf_loss"]) <= 1e-5 * r["hf_loss"], (name, first, r["hf_loss"])

    # the logged per-layer aux loss == megatron-core's formula by hand from HF router logits
    logged = {int(k.rsplit("_", 1)[1]): v for k, v in r["aux_ep2"][0].items()
              if k.startswith("moe/aux_loss/")}
    hand = {int(k): v for k, v in r["hand_aux"].items()}
    assert sorted(logged) == sorted(hand) == [0, 2, 3]  # layer 1 is dense (mlp_only_layers)
    for layer, value in hand.items():
        assert abs(logged[layer] - value) <= 1e-5 * value, (layer, logged, hand)
    assert all(1.0 <= r["aux_ep2"][0][f"moe/imbalance/layer_{l:02d}"] <= 8.0 for l in hand)

    # TP2 x EP2 (sequence parallel) curve == TP1 x EP1 curve
    assert len(r["ep1"]) == len(r["tp2ep2"]) == 5 and r["ep1"][-1]["loss"] < r["ep1"][0]["loss"]
    for a, b in zip(r["ep1"], r["tp2ep2"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a, b)
        assert math.isfinite(b["grad_norm"])

    print(json.dumps({  # the numbers, for the record (pytest -s)
        "loss_rel_diff_vs_hf": {n: abs(r[n][0]["loss"] - r["hf_loss"]) / r["hf_loss"]
                                for n in ("ep1", "tp2ep2", "aux_ep2")},
        "aux_rel_diff_vs_hand": {l: abs(logged[l] - v) / v for l, v in hand.items()},
        "tp2ep2_vs_ep1_max_abs": max(abs(a["loss"] - b["loss"])
                                     for a, b in zip(r["ep1"], r["tp2ep2"])),
        "resume_max_abs": max(abs(a["loss"] - b["loss"])
                              for a, b in zip(r["aux_ep2"][2:], r["resumed"]))}, indent=1))

    # exact resume of the EP2 run, under the other experts implementation
    assert [h["iteration"] for h in r["resumed"]] == [3, 4]
    for a, b in zip(r["aux_ep2"][2:], r["resumed"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0), (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
