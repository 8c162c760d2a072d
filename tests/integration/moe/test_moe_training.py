"""Mixture-of-Experts SFT on megatron-core under gloo (the training runs of the shared MoE launch):

- the iteration-1 language-model loss equals transformers' masked loss (packed rows) at EP1 and
  at EP2;
- the per-layer auxiliary loss the run logs equals megatron-core's formula computed by hand
  from transformers' router logits of the same tokens (padding excluded);
- the loss curve at TP2 x EP2 (with sequence parallelism) and at CP2 x EP2 (context
  parallelism, trained from the HF directory) equals TP1 x EP1's within 1e-5 over 5
  iterations, and TP2 x PP2's (sequence parallel, the second stage's MoE layers too) over 3,
  with the same gradient norms and per-layer aux losses, z-losses and load imbalance;
- ``--expert-tensor-parallel-size 1`` at TP2 x EP2 trains TP1 EP1's curve, saves its
  weights in Megatron-LM's files for that case and resumes from them exactly;
- an EP2 run (distributed optimizer, grouped_mm experts) resumed from its iteration-2 save
  redoes iterations 3 and 4 exactly; resumed under the sequential experts it is refused (the
  optimizer state's layout differs), naming both implementations and ``--no-load-optim``;
- the grouped experts (``grouped_mm``) train the per-expert loop's (``sequential``) curve at
  EP1 within 1e-6: losses, gradient norms, routing statistics;
- full activation recompute at EP2 gives EP1's curve and per-layer aux loss (the routing losses
  are counted once, in the recomputation), bf16 stays within 3e-2 of fp32;
- LoRA with per-expert adapters gives one curve at EP1, EP2, EP4, TP2 x EP2 (SP) and
  PP2 x EP2; its adapters-only save, resharded to EP4, resumes; its PEFT export, loaded by peft
  onto the HF model, gives the merged export's logits;
- frozen routers and routed experts are saved and exported bit for bit;
- ``--eval-generate`` at EP2 gives transformers' greedy tokens.

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

    # iteration-1 LM loss == transformers' masked loss, at EP1 and EP2 (TP1 and TP2), CP2
    for name in ("ep1", "tp2ep2", "aux_ep2", "cp2ep2_hf"):
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

    # TP2 x EP2 and TP2 x PP2 (sequence parallel) and CP2 x EP2 (from the HF directory) curves
    # == TP1 x EP1 curve, aux loss and z-loss on: losses, gradient norms, per-layer routing
    assert len(r["ep1"]) == len(r["tp2ep2"]) == len(r["cp2ep2_hf"]) == 5
    assert r["ep1"][-1]["loss"] < r["ep1"][0]["loss"]
    for other in ("tp2ep2", "tp2pp2", "cp2ep2_hf", "tp2etp1ep2_hf"):
        for a, b in zip(r["ep1"], r[other]):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (other, a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (other, a, b)
            keys = [k for k in a if k.startswith("moe/")]
            assert {k.split("/")[1] for k in keys} == {"aux_loss", "z_loss", "imbalance"}
            for key in keys:
                assert abs(a[key] - b[key]) <= 1e-5 * a[key], (other, key, a[key], b[key])

    print(json.dumps({  # the numbers, for the record (pytest -s)
        "loss_rel_diff_vs_hf": {n: abs(r[n][0]["loss"] - r["hf_loss"]) / r["hf_loss"]
                                for n in ("ep1", "tp2ep2", "aux_ep2")},
        "aux_rel_diff_vs_hand": {l: abs(logged[l] - v) / v for l, v in hand.items()},
        "tp2ep2_vs_ep1_max_abs": max(abs(a["loss"] - b["loss"])
                                     for a, b in zip(r["ep1"], r["tp2ep2"])),
        "tp2pp2_vs_ep1_max_abs": max(abs(a["loss"] - b["loss"])
                                     for a, b in zip(r["ep1"], r["tp2pp2"])),
        "cp2ep2_vs_ep1_max_abs": max(abs(a["loss"] - b["loss"])
                                     for a, b in zip(r["ep1"], r["cp2ep2_hf"])),
        "cp2ep2_vs_ep1_grad_norm_max_rel": max(abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"]
                                               for a, b in zip(r["ep1"], r["cp2ep2_hf"])),
        "grouped_vs_sequential_max_rel": {
            key: max(abs(a[key] - b[key]) / abs(b[key])
                     for a, b in zip(r["ep1"], r["ep1_sequential"]))
            for key in ("loss", "grad_norm")},
        "resume_max_abs": max(abs(a["loss"] - b["loss"])
                              for a, b in zip(r["aux_ep2"][2:], r["resumed"])),
        "recompute_vs_ep1_max_abs": max(abs(a["loss"] - b["loss"])
                                        for a, b in zip(r["ep1"], r["recompute_ep2"])),
        "bf16_vs_fp32_max_rel": max(abs(a["loss"] - b["loss"]) / a["loss"]
                                    for a, b in zip(r["ep1"], r["bf16_ep2"]))}, indent=1))

    # the grouped experts (3-D parameters, weight gradients into main_grad) train the per-expert
    # loop's curve: losses, gradient norms and routing statistics
    assert len(r["ep1_sequential"]) == len(r["ep1"]) == 5
    for a, b in zip(r["ep1"], r["ep1_sequential"]):
        for key in ("loss", "grad_norm", *(k for k in a if k.startswith("moe/"))):
            assert abs(a[key] - b[key]) <= 1e-6 * abs(b[key]), (key, a, b)

    # exact resume of the EP2 run; under the other experts implementation its optimizer state
    # (one 3-D parameter per projection) does not fit, which the resume says before loading
    assert [h["iteration"] for h in r["resumed"]] == [3, 4]
    refusal = r["resumed_sequential"]
    assert refusal.startswith("ResumeError: ") and "--moe-experts-impl grouped_mm" in refusal \
        and "--moe-experts-impl sequential" in refusal and "--no-load-optim" in refusal, refusal
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



@pytest.mark.xdist_group("multiprocess")
def test_lora_on_routed_experts_is_the_same_run_at_every_layout(moe_launch, tmp_path):
    """Per-expert adapters (A seeded by the global expert index): the 3-iteration curve at EP2,
    EP4, TP2 x EP2 (sequence parallel; these two with the distributed optimizer) and PP2 x EP2
    is EP1's within 1e-5 relative, grad norm
    too (every routed expert's adapter trains: ``_lora_checks``); the EP2 run's iteration-2
    save resharded to EP4 continues with iteration 3's loss."""
    r = moe_launch["train"]
    ref = r["lora_ep1"]
    assert [h["iteration"] for h in ref] == [1, 2, 3] and ref[-1]["loss"] < ref[0]["loss"]
    for name in ("lora_ep2", "lora_ep4", "lora_tp2ep2", "lora_pp2ep2"):
        for a, b in zip(ref, r[name], strict=True):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (name, a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (name, a, b)
    resharded = r["lora_resharded_ep4"]
    print(json.dumps({
        "lora_max_rel_vs_ep1": {n: max(abs(a["loss"] - b["loss"]) / a["loss"]
                                       for a, b in zip(ref, r[n]))
                                for n in ("lora_ep2", "lora_ep4", "lora_tp2ep2", "lora_pp2ep2")},
        "lora_ep1_curve": [h["loss"] for h in ref],
        "resharded_ep4_iter3_rel": abs(resharded[0]["loss"] - r["lora_ep2"][2]["loss"])
        / resharded[0]["loss"], "run_seconds": r.get("seconds")}, indent=1))
    assert [h["iteration"] for h in resharded] == [3]
    assert abs(resharded[0]["loss"] - r["lora_ep2"][2]["loss"]) <= 1e-5 * resharded[0]["loss"]
    _lora_checks(moe_launch["root"] / "lora", moe_launch["hf"], tmp_path)


@pytest.mark.xdist_group("multiprocess")
def test_moe_eval_generations_equal_transformers_generate(moe_launch, sft_assets):
    """--eval-generate at EP2 (DP4 for attention, experts split over 2 ranks): 32 greedy tokens
    equal transformers' generate on the weights exported at that iteration."""
    from sft_testing import check_generations_against_hf

    history = moe_launch["train"]["generate_ep2"]
    assert [h["iteration"] for h in history] == [1, 2]
    check_generations_against_hf(history[-1]["generations"], moe_launch["root"] / "gen-export",
                                 sft_assets, 32)


@pytest.mark.xdist_group("multiprocess")
def test_frozen_router_and_experts_keep_their_exact_values(moe_launch, tmp_path):
    """--moe-router-freeze --moe-experts-freeze at EP2: after an iteration the saved routers
    and routed experts are the converted ones bit for bit, and so are they in the HF export;
    attention, the shared expert and the dense MLPs trained."""
    import torch
    from safetensors.torch import load_file

    from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf

    r = moe_launch["train"]["frozen_ep2"]
    assert len(r) == 1 and math.isfinite(r[0]["loss"])
    root = moe_launch["root"]
    for ep in ("000", "001"):
        base = torch.load(root / f"ep2/iter_0000001/mp_rank_00_{ep}/model_optim_rng.pt",
                          weights_only=True)["model"]
        saved = torch.load(root / f"frozen/iter_0000001/mp_rank_00_{ep}/model_optim_rng.pt",
                           weights_only=True)["model"]
        frozen = [n for n in base if ".mlp.router." in n or ".mlp.experts." in n]
        trained = [n for n in base if n not in frozen and n.endswith("weight")
                   and "norm" not in n]
        assert len(frozen) == 2 * (1 + 2 * 2)  # 2 MoE layers: router + 2 local experts x 2
        assert all(torch.equal(saved[n], base[n]) for n in frozen)
        changed = [n for n in trained if not torch.equal(saved[n], base[n])]
        assert sorted(changed) == sorted(trained)
        assert any(".shared_experts." in n for n in changed)
    export_megatron_to_hf(root / "frozen", tmp_path / "hf", moe_launch["hf"],
                          ExportOptions(progress=False))
    src, out = (load_file(next(iter(sorted(d.glob("*.safetensors")))))
                for d in (Path(moe_launch["hf"]), tmp_path / "hf"))
    routing = [n for n in src if ".mlp.gate.weight" in n or ".mlp.experts." in n]
    assert len(routing) == 2 * (1 + 4 * 3) and all(torch.equal(out[n], src[n]) for n in routing)
    assert not torch.equal(out["model.layers.0.self_attn.q_proj.weight"],
                           src["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.xdist_group("multiprocess")
def test_gradient_norm_and_clipping_at_tp2_ep2_are_the_single_rank_ones(moe_launch):
    """megatron-core's chained (dense + expert) optimizer at TP2 x EP2 with SP, on global batch
    0 before any step: its gradient norm is the whole model's, summed by hand over every
    parameter of a TP1 EP1 rank (which holds them all), and clipping scales every gradient,
    dense and expert, by ``max_norm / norm``. An expert gradient left out of the norm (megatron-core
    once omitted some) or a parameter left out of clipping would show here."""
    r = moe_launch["train"]
    whole, split = r["ep1/clip"], r["tp2ep2/clip"]
    probes = {"TP1 EP1": whole, "TP2 EP2": split, "TP2 ETP1 EP2": r["tp2etp1ep2_hf/clip"]}
    clip = whole["max_norm"]
    reference = whole["hand_norm"]
    assert reference > 2 * clip  # clipping is active
    for name, probe in probes.items():
        assert abs(probe["norm"] - reference) <= 1e-5 * reference, (name, probe, reference)
        assert abs(probe["clipped_norm"] - clip) <= 1e-5 * clip, (name, probe)
        assert probe["scale_dev"] <= 1e-5, (name, probe)
    # a TP2 x EP2 rank holds part of the model: its own sum of squares is not the norm
    assert split["hand_norm"] < 0.95 * reference and split["elements"] < whole["elements"]
    # and the first logged gradient norm of every layout is the same one
    for name in ("ep1", "tp2ep2", "cp2ep2_hf", "tp2etp1ep2_hf"):
        assert abs(r[name][0]["grad_norm"] - reference) <= 1e-5 * reference, (name, r[name][0])
    print(json.dumps({"grad_norm_single_rank": reference, "probes": probes}))


@pytest.mark.xdist_group("multiprocess")
def test_whole_experts_under_tp_train_and_save_as_tp_equal_etp(moe_launch):
    """``--expert-tensor-parallel-size 1`` at TP2 (SP) x EP2, from the HF directory, with the
    distributed optimizer: the curve is TP1 EP1's (above, with the gradient norm probe), its
    saves hold Megatron-LM's files for that case (one per EP rank ``e``, named by TP rank
    ``e mod 2``), and resuming from iteration 1 redoes iterations 2 and 3 exactly (3's loss
    follows step 2, taken with the restored Adam state)."""
    root, r = moe_launch["root"], moe_launch["train"]
    for it in ("iter_0000001", "iter_0000003"):
        files = sorted(str(p.relative_to(root / "etp1_run" / it))
                       for p in (root / "etp1_run" / it).rglob("*.pt"))
        assert files == [f"mp_rank_{t}/{f}" for t in ("00_000", "01_001")
                         for f in ("distrib_optim.pt", "model_optim_rng.pt")], files
    assert [h["iteration"] for h in r["etp1_resumed"]] == [2, 3]
    for a, b in zip(r["tp2etp1ep2_hf"][1:], r["etp1_resumed"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), (a, b)


@pytest.mark.xdist_group("multiprocess")
def test_fsdp_shards_the_grouped_experts_and_saves_them_by_checkpoint_name(moe_launch):
    """Megatron-FSDP (ZeRO-3 over the 4 data-parallel ranks) at EP1, each 3-D expert parameter
    sharded with the rest: the curve is DDP's (losses, gradient norms, routing statistics within
    1e-5 over 5 iterations), and the rank file it gathers at iteration 5 holds the converted
    checkpoint's names and shapes (``local_experts.{e}.linear_fc1.weight``, one per expert),
    with every expert's weights trained."""
    import torch

    root, r = moe_launch["root"], moe_launch["train"]
    assert len(r["fsdp_ep1"]) == len(r["ep1"]) == 5
    for a, b in zip(r["ep1"], r["fsdp_ep1"]):
        for key in ("loss", "grad_norm", *(k for k in a if k.startswith("moe/"))):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a, b)
    start = torch.load(next((root / "ep1").glob("iter_*/mp_rank_00/model_optim_rng.pt")),
                       weights_only=True)["model"]
    saved = torch.load(root / "fsdp-ep1" / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt",
                       weights_only=True)["model"]
    tensors = {k for k, v in start.items() if torch.is_tensor(v)}
    assert tensors == {k for k, v in saved.items() if torch.is_tensor(v)}
    assert {k: start[k].shape for k in tensors} == {k: saved[k].shape for k in tensors}
    experts = sorted(k for k in tensors if ".mlp.experts.local_experts." in k)
    assert len(experts) == 2 * 2 * 4, experts  # 2 MoE layers x 4 experts x 2 linears
    for k in experts:
        assert (saved[k] - start[k]).abs().max() > 0, k
    print(json.dumps({"fsdp_vs_ddp_max_rel": {
        key: max(abs(a[key] - b[key]) / abs(a[key]) for a, b in zip(r["ep1"], r["fsdp_ep1"]))
        for key in ("loss", "grad_norm")}}))


def _lora_checks(lora_run, hf, tmp_path):
    """What a LoRA run of a MoE model holds (adapters only: attention, dense MLPs, the shared
    expert, each local routed expert; no router), and that its PEFT export is its merged
    model."""
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
    assert "decoder.layers.3.mlp.experts.local_experts.1.linear_fc2.lora.B" in names
    assert all(".lora." in n for n in names) and not any("router" in n for n in names)
    for f in files:  # every routed expert's adapter trained (B starts at zero)
        state = torch.load(f, weights_only=True)["model"]
        experts_b = {n: t for n, t in state.items() if "local_experts" in n and n.endswith("B")}
        assert len(experts_b) == 2 * 2 * 2  # 2 MoE layers x 2 local experts x fc1/fc2
        print({n: f"{t.abs().max().item():.2e}" for n, t in experts_b.items()})
        assert all(t.abs().max() > 0 for t in experts_b.values()), experts_b
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
    assert (merged - peft).abs().max() <= 1e-4


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


@pytest.mark.xdist_group("multiprocess")
def test_switching_layouts_in_one_process_leaks_no_process_groups(moe_launch):
    """Tens of trainers at different layouts in one launch: the thread count stays flat
    (``Trainer.close`` breaks DDP's hook cycle through autograd and ``release_model_parallel``
    closes megatron-core's gloo groups; without them each run leaked ~50 polling threads)."""
    threads = moe_launch["train"]["threads"]
    assert len(threads) > 10 and max(threads) - threads[0] <= 40, threads
