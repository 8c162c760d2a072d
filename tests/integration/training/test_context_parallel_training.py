"""Context parallelism, sequence parallelism and the chunked loss in the real model under gloo,
all from one 4-rank launch (``cp_worker.py``; megatron-core's parallel state is rebuilt per
layout):

- logits and the SFT loss equal transformers' at CP2, CP4, CP2 x TP2 with SP and CP2 x PP2 (and
  their CP1 layouts), on packed rows with a document longer than a chunk, a 1-token document, a
  document spanning the chunk pair of a rank and padding; tied (Qwen2) and untied (Llama, with
  llama3 RoPE scaling) embeddings; and DeepSeek-V3's multi-latent attention (q/k head dim !=
  v head dim, YaRN, sigmoid-routed experts) at CP1 and CP2;
- parameter gradients summed over CP equal CP1's, and the chunked loss (chunks of 7 tokens)
  gives the same loss and gradients as the unchunked one at TP1, CP2 x TP2 with SP and
  CP2 x PP2;
- through the trainer: a 5-iteration curve (and gradient norms) at CP2 equals CP1, with the
  distributed optimizer and with PP2 x VPP2 and full recompute; resuming at CP2 is exact and
  writes TP1 PP1's files once; LoRA at CP2 equals LoRA without CP; TP2 with SP equals TP2 without (3 iterations of 4 rows), with and without
  LoRA, and the trainer's loss at CP2 x TP2 with SP and the chunked loss, and at CP4 on
  unpacked rows, equals transformers'.

The chunked loss's ``>= 4x`` smaller peak tensor and its exactness on one process (fp32, bf16,
padded vocabulary) are unit tests (``tests/unit/training/test_chunked_loss.py``), the CP split
and attention math too (``tests/unit/runtime/test_context_parallel_math.py``).
"""

import json
from pathlib import Path

import pytest

from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.bridge.random_hf_model import make_random_hf_model
from megatron.sft.runtime.layout import ParallelLayout
from sft_testing import run_torchrun

WORKER = Path(__file__).with_name("cp_worker.py")
SEQ = 48
#: CP2 chunks are 12 tokens, CP4's 6: a document longer than a chunk (30), a 1-token document,
#: padding (row 0); a document over CP2 rank 1's chunk pair [12, 36) (row 1, [5, 45))
ROWS = [[30, 1, 13], [5, 40, 3]]
#: (tp, pp, cp, sequence parallel); each CP1 layout before the CP layouts it is compared with
LAYOUTS = [(1, 1, 1, False), (1, 1, 2, False), (1, 1, 4, False), (2, 1, 1, False),
           (2, 1, 2, True), (1, 2, 1, False), (1, 2, 2, False)]
CP_LAYOUTS = [f"TP{tp}PP{pp}CP{cp}" + ("SP" if sp else "") for tp, pp, cp, sp in LAYOUTS
              if cp > 1]
#: GPT-OSS (EP1: its TP is 1, see bridge.architectures.gpt_oss): CP1, then CP2
GPT_OSS_LAYOUTS = [(1, 1, 1, False), (1, 1, 2, False)]
#: DeepSeek-V3's multi-latent attention: CP1 and CP2 on the same packed rows
MLA_LAYOUTS = [(1, 1, 1, False), (1, 1, 2, False)]
#: the chunked loss vs the unchunked one: TP1, and TP2 with SP, CP and PP each in one layout
CHUNKED = [(1, 1, 1, False), (2, 1, 2, True), (1, 2, 2, False)]


def _train(name, ckpt, data, **overrides):
    cfg = dict(load=ckpt, data_path=data, seq_length=128, micro_batch_size=2,
               global_batch_size=8, train_iters=5, lr=1e-3, lr_decay_style="cosine",
               lr_warmup_iters=1, no_progress=True, split="90,10,0", attention_backend="sdpa",
               transformer_impl="local")
    cfg.update(overrides)
    return {"name": name, "config": cfg}


@pytest.fixture(scope="module")
def results(sft_assets, checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp")
    llama = make_random_hf_model("LlamaForCausalLM", tmp / "hf-llama", seed=11)
    llama_ckpts = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        llama_ckpts[f"TP{tp}PP{pp}"] = str(tmp / f"llama-tp{tp}pp{pp}")
        convert_hf_to_megatron(llama, llama_ckpts[f"TP{tp}PP{pp}"],
                               ConvertOptions(layout=ParallelLayout(tp, pp), progress=False))
    qwen = {f"TP{tp}PP{pp}": checkpoints[(tp, pp)] for tp, pp in ((1, 1), (2, 1), (1, 2))}
    gpt_oss = make_random_hf_model("GptOssForCausalLM", tmp / "hf-gpt-oss", seed=13)
    convert_hf_to_megatron(gpt_oss, tmp / "gpt-oss", ConvertOptions(progress=False))
    # the trainer's first loss on the SFT data (the tokenizer's vocabulary), a sample a row
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(sft_assets["tokenizer"]))
    gpt_oss_sft = make_random_hf_model("GptOssForCausalLM", tmp / "hf-gpt-oss-sft", seed=14,
                                       overrides=dict(vocab_size=vocab))
    convert_hf_to_megatron(gpt_oss_sft, tmp / "gpt-oss-sft", ConvertOptions(progress=False))
    gpt_oss_run = dict(packing=False, moe_experts_impl="grouped_mm")
    # multi-latent attention (q/k head 24 != v head 12, YaRN) with sigmoid-routed experts
    deepseek = make_random_hf_model("DeepseekV3ForCausalLM", tmp / "hf-deepseek", seed=13)
    convert_hf_to_megatron(deepseek, tmp / "deepseek-tp1pp1", ConvertOptions(progress=False))
    deepseek_sft = make_random_hf_model("DeepseekV3ForCausalLM", tmp / "hf-deepseek-sft",
                                        seed=14, overrides=dict(vocab_size=vocab))
    convert_hf_to_megatron(deepseek_sft, tmp / "deepseek-sft", ConvertOptions(progress=False))
    data, tp2 = sft_assets["data"], checkpoints[(2, 1)]
    one = checkpoints[(1, 1)]
    lora = dict(lora_rank=4, lora_alpha=8.0, lr=1e-2)
    # no warmup: every one of the 3 steps moves the weights (the warmup's first step has lr 0)
    sp_run = dict(tensor_model_parallel_size=2, train_iters=3, global_batch_size=4,
                  lr_warmup_iters=0)
    train = [
        _train("cp1", one, data),
        # CP2 x DP2 with the distributed optimizer, saved at 2 and resumed from there
        _train("cp2", one, data, context_parallel_size=2, save=str(tmp / "cp2"),
               save_interval=2, keep_last=0, use_distributed_optimizer=True),
        {**_train("cp2_resumed", str(tmp / "cp2"), data, context_parallel_size=2,
                  save=str(tmp / "cp2-resumed"), use_distributed_optimizer=True),
         "rewind_to": 2},
        # CP2 x PP2 interleaved (VPP2) with full recompute: the all-gather runs again in backward
        _train("cp2_vpp_recompute", checkpoints["vpp"], data, context_parallel_size=2,
               pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1,
               recompute_granularity="full"),
        # sequence parallelism: 3-iteration curves of 4 rows (the CP curve above has 5 of 8)
        # (TP2 without LoRA on cp1's 8 rows: its first gradient norm is cp1's)
        _train("tp2", tp2, data, **{**sp_run, "global_batch_size": 8}),
        _train("tp2_sp", tp2, data, sequence_parallel=True, **{**sp_run, "global_batch_size": 8}),
        _train("tp2_lora", tp2, data, **sp_run, **lora),
        _train("tp2_sp_lora", tp2, data, sequence_parallel=True, **sp_run, **lora),
        _train("cp2_lora", one, data, context_parallel_size=2, train_iters=3,
               global_batch_size=4, lr_warmup_iters=0, **lora),
        {**_train("cp2_tp2_sp_chunked_hf", tp2, data, context_parallel_size=2,
                  tensor_model_parallel_size=2, sequence_parallel=True, chunked_loss="on"),
         "hf_loss": True, "hf": str(sft_assets["hf"])},
        {**_train("cp4_unpacked_hf", one, data, context_parallel_size=4, packing=False),
         "hf_loss": True, "hf": str(sft_assets["hf"])},
        # the 2026 MoE families' first loss through the trainer, a sample a row, at CP1 and CP2
        # (sinks and windows; MLA with q/k head != v head); packed rows at CP2 are the model
        # proofs above ("gpt-oss", "deepseek-v3-mla")
        *({**_train(f"{name}_cp{cp}_hf", str(tmp / ckpt), data, context_parallel_size=cp,
                    **gpt_oss_run), "hf_loss": True, "hf": str(hf)}
          for name, ckpt, hf in (("gpt_oss", "gpt-oss-sft", gpt_oss_sft),
                                 ("deepseek", "deepseek-sft", deepseek_sft))
          for cp in (1, 2)),
    ]
    spec = {"out": str(tmp / "results.json"),
            "model": {"models": [{"name": "qwen2-tied", "hf": str(sft_assets["hf"]),
                                  "ckpts": qwen},
                                 {"name": "llama-untied", "hf": str(llama),
                                  "ckpts": llama_ckpts},
                                 # sinks and windows (8) on documents crossing CP2's chunks;
                                 # no aux loss: its statistics are per rank's tokens
                                 {"name": "gpt-oss", "hf": str(gpt_oss),
                                  "ckpts": {"TP1PP1": str(tmp / "gpt-oss")},
                                  "layouts": GPT_OSS_LAYOUTS, "chunked_layouts": [],
                                  "overrides": {"moe_aux_loss_coeff": 0.0},
                                  "experts": "grouped_mm"},
                                 {"name": "deepseek-v3-mla", "hf": str(deepseek),
                                  "ckpts": {"TP1PP1": str(tmp / "deepseek-tp1pp1")},
                                  "layouts": MLA_LAYOUTS}],
                      "layouts": LAYOUTS, "chunked_layouts": CHUNKED, "rows": ROWS,
                      "seq_length": SEQ},
            "train": train}
    (tmp / "spec.json").write_text(json.dumps(spec))
    proc = run_torchrun(4, WORKER, str(tmp / "spec.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((tmp / "results.json").read_text())


def _curve(results, name):
    return results["train"][name]["result"]


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("model", ["qwen2-tied", "llama-untied", "deepseek-v3-mla"])
def test_logits_and_loss_equal_transformers_at_every_layout(results, model):
    layouts = results["model"][model]
    assert set(CP_LAYOUTS if model != "deepseek-v3-mla" else ["TP1PP1CP2"]) <= set(layouts)
    for name, r in layouts.items():
        assert r["logits_abs_max"] > 0.1, (name, "degenerate reference")
        assert r["logits_max_abs_diff"] <= 1e-4, (name, r)
        assert abs(r["loss_sum"] - r["hf_loss_sum"]) <= 1e-5 * r["hf_loss_sum"], (name, r)


@pytest.mark.xdist_group("multiprocess")
def test_gpt_oss_sinks_and_windows_at_cp2_equal_transformers_and_cp1(results):
    """Logits and the masked loss equal transformers' (each document run alone) at CP1 and
    CP2, and CP2's gradients (sinks included) equal CP1's, on packed rows whose documents cross
    the CP chunks, with windowed layers between full ones."""
    layouts = results["model"]["gpt-oss"]
    assert set(layouts) == {"TP1PP1CP1", "TP1PP1CP2"}
    for name, r in layouts.items():
        assert r["logits_abs_max"] > 0.1, (name, "degenerate reference")
        assert r["logits_max_abs_diff"] <= 1e-4, (name, r)
        assert abs(r["loss_sum"] - r["hf_loss_sum"]) <= 1e-5 * r["hf_loss_sum"], (name, r)
        assert r["same_grad_keys"] and r["grad_abs_max"] > 1e-3, (name, r)
        assert r["grad_max_abs_diff_vs_cp1"] <= 1e-5 * max(1.0, r["grad_abs_max"]), (name, r)


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("model", ["qwen2-tied", "llama-untied", "deepseek-v3-mla"])
def test_gradients_equal_cp1_and_the_chunked_loss_is_exact(results, model):
    chunked = {f"TP{tp}PP{pp}CP{cp}" + ("SP" if sp else "") for tp, pp, cp, sp in CHUNKED
               if model != "deepseek-v3-mla" or cp == 1 and tp == pp == 1}
    assert chunked <= set(results["model"][model])
    for name, r in results["model"][model].items():
        assert r["same_grad_keys"], name
        assert r["grad_abs_max"] > 1e-3, (name, "no gradient reached the parameters")
        scale = max(1.0, r["grad_abs_max"])
        assert r["grad_max_abs_diff_vs_cp1"] <= 1e-5 * scale, (name, r)
        assert r["chunked_grad_max_abs_diff"] <= 1e-5 * scale, (name, r)
        assert abs(r["chunked_loss_sum"] - r["loss_sum"]) <= 1e-6 * r["loss_sum"], (name, r)


@pytest.mark.xdist_group("multiprocess")
def test_cp2_curve_equals_cp1_and_resumes_exactly(results):
    cp1, cp2, resumed = (_curve(results, n) for n in ("cp1", "cp2", "cp2_resumed"))
    assert "CP2" in results["train"]["cp2"]["describe"]
    assert len(cp1) == len(cp2) == 5 and cp1[-1]["loss"] < cp1[0]["loss"]
    for a, b in zip(cp1, cp2):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a, b)
        assert a["loss_tokens"] == b["loss_tokens"]
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (a, b)
    assert [h["iteration"] for h in resumed] == [3, 4, 5]
    for a, b in zip(cp2[2:], resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0), (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    # one writer per file: CP ranks hold the same weights, the files are TP1 PP1's
    saved = results["train"]["cp2"]["files"]
    assert saved == ["mp_rank_00/distrib_optim.pt", "mp_rank_00/model_optim_rng.pt"], saved


@pytest.mark.xdist_group("multiprocess")
def test_cp_composes_with_interleaved_pipelines_recompute_and_lora(results):
    cp1, vpp = _curve(results, "cp1"), _curve(results, "cp2_vpp_recompute")
    assert "CP2" in results["train"]["cp2_vpp_recompute"]["describe"] and len(vpp) == 5
    for a, b in zip(cp1, vpp):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a, b)
    # LoRA at CP2 x DP2 trains what LoRA at TP2 x DP2 (no CP) does
    for a, b in zip(_curve(results, "tp2_lora"), _curve(results, "cp2_lora")):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a, b)


@pytest.mark.xdist_group("multiprocess")
def test_sequence_parallel_curve_equals_tp2_with_and_without_lora(results):
    for plain, sp in (("tp2", "tp2_sp"), ("tp2_lora", "tp2_sp_lora")):
        a_curve, b_curve = _curve(results, plain), _curve(results, sp)
        assert len(a_curve) == len(b_curve) == 3
        for a, b in zip(a_curve, b_curve):
            assert abs(a["loss"] - b["loss"]) <= 1e-4, (sp, a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (sp, a, b)
    # TP-split weights count on every TP rank in the gradient norm (tp_attributes.py): TP2's
    # first gradient norm, on the same 8 rows and weights, is TP1's
    tp1, tp2 = _curve(results, "cp1")[0], _curve(results, "tp2")[0]
    assert tp1["loss"] == pytest.approx(tp2["loss"], rel=1e-6)
    assert tp1["grad_norm"] == pytest.approx(tp2["grad_norm"], rel=1e-5), (tp1, tp2)
    # LoRA trains something else than full fine-tuning (the adapters really ran under SP)
    assert abs(_curve(results, "tp2_sp_lora")[-1]["loss"] - _curve(results, "tp2_sp")[-1]["loss"]) \
        > 1e-3


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("name, layout", [("cp2_tp2_sp_chunked_hf", "TP2 PP1 CP2"),
                                          ("cp4_unpacked_hf", "TP1 PP1 CP4"),
                                          ("gpt_oss_cp1_hf", "TP1 PP1"),
                                          ("gpt_oss_cp2_hf", "TP1 PP1 CP2"),
                                          ("deepseek_cp1_hf", "TP1 PP1"),
                                          ("deepseek_cp2_hf", "TP1 PP1 CP2")])
def test_trainer_loss_equals_transformers(results, name, layout):
    """CP2 x TP2 with SP and the chunked loss on packed rows; CP4 on unpacked (padded) rows;
    GPT-OSS and DeepSeek-V3 (MoE) at CP1 and CP2."""
    run = results["train"][name]
    r = run["result"]
    assert run["chunked_loss"] == (name == "cp2_tp2_sp_chunked_hf") and layout in run["describe"]
    assert r["megatron_tokens"] == r["hf_tokens"] > 0
    assert abs(r["megatron"] - r["hf"]) <= 1e-5 * r["hf"], r
