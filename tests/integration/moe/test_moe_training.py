"""Mixture-of-Experts SFT on megatron-core under gloo (five runs of the shared MoE launch):

- the iteration-1 language-model loss equals transformers' masked loss (packed rows) at EP1 and
  at EP2;
- the per-layer auxiliary loss the run logs equals megatron-core's formula computed by hand
  from transformers' router logits of the same tokens (padding excluded);
- the loss curve at TP2 x EP2 (with sequence parallelism) equals TP1 x EP1's within 1e-4 over
  5 iterations, and TP2 x PP2's (sequence parallel, the second stage's MoE layers too) over 3,
  with the same per-layer aux losses;
- an EP2 run (distributed optimizer, grouped_mm experts) resumed from its iteration-2 save,
  under the sequential experts implementation, redoes iterations 3 and 4 exactly;
- full activation recompute at EP2 gives EP1's curve and per-layer aux loss (the routing losses
  are counted once, in the recomputation), bf16 stays within 3e-2 of fp32;
- LoRA at EP2 adapts attention and the shared expert (not the routed experts), and its PEFT
  export, loaded by peft onto the HF model, gives the merged export's logits.

The model is Qwen2-MoE-shaped: a sigmoid-gated shared expert, top-2 without renormalisation,
dense layers between the MoE ones; Qwen3-MoE and Mixtral are in the logits parity cases. The
runs are in the shared MoE launch (conftest.py).
"""

import json
import math
from pathlib import Path

import pytest


@pytest.mark.xdist_group("multiprocess")
def test_moe_sft_loss_aux_loss_layouts_and_resume(moe_launch, tmp_path):
    r = moe_launch["train"]

    # iteration-1 LM loss == transformers' masked loss, at EP1 and EP2 (TP1 and TP2)
    for name in ("ep1", "tp2ep2", "aux_ep2"):
        first = r[name][0]
        assert first["loss_tokens"] == r["hf_tokens"] > 0
        assert abs(first["loss"] - r["hf_loss"]) <= 1e-5 * r["hf_loss"], (name, first, r["hf_loss"])

    # the logged per-layer aux loss == megatron-core's formula by hand from HF router logits
    logged = {int(k.rsplit("_", 1)[1]): v for k, v in r["aux_ep2"][0].items()
              if k.startswith("moe/aux_loss/")}
    hand = {int(k): v for k, v in r["hand_aux"].items()}
    assert sorted(logged) == sorted(hand) == [1, 3]  # layers 0 and 2 are dense
    for layer, value in hand.items():
        assert abs(logged[layer] - value) <= 1e-5 * value, (layer, logged, hand)
    assert all(1.0 <= r["aux_ep2"][0][f"moe/imbalance/layer_{l:02d}"] <= 4.0 for l in hand)

    # TP2 x EP2 and TP2 x PP2 (sequence parallel) curves == TP1 x EP1 curve
    assert len(r["ep1"]) == len(r["tp2ep2"]) == 5 and r["ep1"][-1]["loss"] < r["ep1"][0]["loss"]
    for other in ("tp2ep2", "tp2pp2"):
        for a, b in zip(r["ep1"], r[other]):
            assert abs(a["loss"] - b["loss"]) <= 1e-4, (other, a, b)
            assert math.isfinite(b["grad_norm"])
            for key in (k for k in a if k.startswith("moe/aux_loss/")):
                assert abs(a[key] - b[key]) <= 1e-4 * a[key], (other, key, a[key], b[key])

    print(json.dumps({  # the numbers, for the record (pytest -s)
        "loss_rel_diff_vs_hf": {n: abs(r[n][0]["loss"] - r["hf_loss"]) / r["hf_loss"]
                                for n in ("ep1", "tp2ep2", "aux_ep2")},
        "aux_rel_diff_vs_hand": {l: abs(logged[l] - v) / v for l, v in hand.items()},
        "tp2ep2_vs_ep1_max_abs": max(abs(a["loss"] - b["loss"])
                                     for a, b in zip(r["ep1"], r["tp2ep2"])),
        "tp2pp2_vs_ep1_max_abs": max(abs(a["loss"] - b["loss"])
                                     for a, b in zip(r["ep1"], r["tp2pp2"])),
        "resume_max_abs": max(abs(a["loss"] - b["loss"])
                              for a, b in zip(r["aux_ep2"][2:], r["resumed"])),
        "recompute_vs_ep1_max_abs": max(abs(a["loss"] - b["loss"])
                                        for a, b in zip(r["ep1"], r["recompute_ep2"])),
        "bf16_vs_fp32_max_rel": max(abs(a["loss"] - b["loss"]) / a["loss"]
                                    for a, b in zip(r["ep1"], r["bf16_ep2"]))}, indent=1))

    # exact resume of the EP2 run, under the other experts implementation
    assert [h["iteration"] for h in r["resumed"]] == [3, 4]
    for a, b in zip(r["aux_ep2"][2:], r["resumed"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0), (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)

    # full recompute at EP2 == EP1 (loss, grad norm, aux loss); bf16 close to fp32
    for a, b in zip(r["ep1"], r["recompute_ep2"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (a, b)
        for key in (k for k in a if k.startswith("moe/")):
            assert abs(a[key] - b[key]) <= 1e-5 * a[key], (key, a[key], b[key])
    for a, b in zip(r["ep1"], r["bf16_ep2"]):
        assert abs(a["loss"] - b["loss"]) <= 3e-2 * a["loss"], (a, b)

    # LoRA at EP2: attention + shared expert adapters, PEFT export == merged export
    assert len(r["lora"]) == 2 and all(math.isfinite(h["loss"]) for h in r["lora"])
    _lora_checks(moe_launch["root"] / "lora", moe_launch["hf"], tmp_path)


def _lora_checks(lora_run, hf, tmp_path):
    """What a LoRA run of a MoE model holds, and that its PEFT export is its merged model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
    from megatron.sft.lora.merge import open_checkpoint
    from megatron.sft.lora.peft_export import export_lora_adapter

    files = sorted((lora_run / "iter_0000002").glob("mp_rank_*/model_optim_rng.pt"))
    assert [f.parent.name for f in files] == ["mp_rank_00_000", "mp_rank_00_001"]
    names = set(torch.load(files[1], weights_only=True)["model"])
    assert "decoder.layers.1.mlp.shared_experts.linear_fc1.lora.A" in names
    assert "decoder.layers.0.mlp.linear_fc1.lora.B" in names  # a dense layer's MLP
    assert "decoder.layers.3.self_attention.linear_qkv.lora.A" in names
    assert not any("local_experts" in n or "router" in n for n in names)
    export_megatron_to_hf(open_checkpoint(lora_run), tmp_path / "merged", hf,
                          ExportOptions(progress=False))
    export_lora_adapter(lora_run, tmp_path / "peft", hf)
    vocab = json.loads((Path(hf) / "config.json").read_text())["vocab_size"]
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(tokens).logits
        base = AutoModelForCausalLM.from_pretrained(hf)
        peft = PeftModel.from_pretrained(base, tmp_path / "peft")(tokens).logits
        plain = AutoModelForCausalLM.from_pretrained(hf)(tokens).logits
    assert (merged - plain).abs().max() > 1e-4  # the adapters learned something
    assert (merged - peft).abs().max() <= 1e-5


@pytest.mark.xdist_group("multiprocess")
def test_deepseek_expert_bias_updates_as_megatron_core_does_or_stays_frozen(moe_launch):
    """DeepSeek-V3 at EP2, 3 steps: with ``--moe-router-bias-update-rate r`` every expert's bias
    (converted from ``e_score_correction_bias``) moved by a whole number of ``±r`` steps, one
    per step at most (megatron-core's sign update in ``finalize_model_grads``), and the log's
    per-layer drift is the largest move; with ``--moe-router-freeze-expert-bias`` the saved
    bias is the release's, bit for bit, and the drift 0."""
    import torch
    from safetensors.torch import load_file

    r, root, rate = moe_launch["train"], moe_launch["root"], moe_launch["bias_rate"]
    released = load_file(str(root / "hf-dsv3" / "model.safetensors"))
    for run, frozen in (("dsv3_bias", False), ("dsv3_frozen", True)):
        history = r[run]
        assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
        saved = torch.load(root / run.replace("_", "-") / "iter_0000003" / "mp_rank_00_001"
                           / "model_optim_rng.pt", weights_only=True)["model"]
        for layer in (1, 2, 3):  # layer 0 is dense (first_k_dense_replace=1)
            start = released[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
            bias = saved[f"decoder.layers.{layer}.mlp.router.expert_bias"]
            assert bias.dtype == torch.float32
            drift = history[-1][f"moe/expert_bias_drift/layer_{layer:02d}"]
            if frozen:
                assert torch.equal(bias, start) and drift == 0.0
                continue
            steps = (bias.double() - start.double()) / rate
            assert torch.allclose(steps, steps.round(), atol=1e-4), steps
            whole = steps.round().abs()
            assert whole.max() <= 3 and whole.max() >= 1, steps
            assert drift == pytest.approx((bias - start).abs().max().item(), abs=1e-7)
