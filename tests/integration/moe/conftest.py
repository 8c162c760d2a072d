"""One 4-rank launch for every Mixture-of-Experts proof that needs processes: the logits parity
cases (test_moe_parity.py) and the training runs (test_moe_training.py) share it, as one
torchrun costs what many cases in it do on a 2-core machine."""

import json
from pathlib import Path

import pytest

from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.bridge.random_hf_model import make_random_hf_model
from megatron.sft.runtime.layout import ParallelLayout
from sft_testing import ARCHITECTURES, run_torchrun

WORKER = Path(__file__).with_name("moe_worker.py")
MOE = [a for a in ARCHITECTURES if get_architecture(a).moe is not None]

#: the layouts every family's logits are checked at, under both experts implementations
PARITY_LAYOUTS = {"EP2": ParallelLayout(1, 1, ep=2), "TP2EP2": ParallelLayout(2, 1, ep=2),
                  "PP2EP2": ParallelLayout(1, 2, ep=2)}
#: and one family each at these (grouped_mm): one local expert per rank, virtual stages,
#: GPT-OSS's attention (sinks and biases split by head) at TP2 over whole experts (ETP 1: its
#: expert biases run there only)
EXTRA_LAYOUTS = {"EP4": ("Qwen2MoeForCausalLM", ParallelLayout(1, 1, ep=4)),
                 "PP2VPP2EP2": ("Qwen3MoeForCausalLM", ParallelLayout(1, 2, 2, ep=2)),
                 "TP2ETP1EP2": ("GptOssForCausalLM", ParallelLayout(2, 1, ep=2, etp=1))}
#: the training runs' model: a sigmoid-gated shared expert, top-2 without renormalisation,
#: dense layers (0, 2) between the MoE ones (1, 3)
TRAIN_ARCH = "Qwen2MoeForCausalLM"
#: the clipping threshold the gradient-norm probes clip to (below the first norm, about 2.2)
CLIP = 0.5
#: DeepSeek-V3's expert-bias update rate in the training runs
BIAS_RATE = 0.01


def parity_cases(tiny_hf_models, root: Path) -> list[dict]:
    cases = []

    def checkpoint(arch, name, layout):
        ckpt = root / f"{arch}_{name}"
        convert_hf_to_megatron(tiny_hf_models[arch], ckpt, ConvertOptions(layout=layout,
                                                                           progress=False))
        return str(ckpt)

    for name, layout in PARITY_LAYOUTS.items():
        for arch in MOE:
            if layout.tp > 1 and get_architecture(arch).moe(
                    get_architecture(arch).tiny_config).linear_bias:
                continue  # GPT-OSS: expert biases run at ETP 1 only (refused, unit-tested)
            ckpt, hf = checkpoint(arch, name, layout), str(tiny_hf_models[arch])
            # (MLA families: the sequential experts at EP2 only; their attention is the same)
            impls = ("grouped_mm", "sequential") if get_architecture(arch).mla is None \
                or name == "EP2" else ("grouped_mm",)
            for experts in impls:
                cases.append({"name": f"{arch}/{name}/{experts}", "ckpt": ckpt, "hf": hf,
                              "experts": experts})
            if name == "EP2":
                if arch == "MixtralForCausalLM":
                    cases.append({"name": f"{arch}/{name}/allgather", "ckpt": ckpt, "hf": hf,
                                  "experts": "grouped_mm",
                                  "overrides": {"moe_token_dispatcher_type": "allgather"}})
                # negative controls: a wrong setting must be seen
                if arch == "Qwen2MoeForCausalLM":
                    cases.append({"name": "control/Qwen2-MoE with its shared-expert gate "
                                  "weight zeroed", "ckpt": ckpt, "hf": hf,
                                  "experts": "grouped_mm", "zero": "shared_experts.gate_weight"})
                if arch == "GptOssForCausalLM":  # sinks, the +1 of the SwiGLU, the windows
                    for what, change in (("sinks zeroed", {"zero": "softmax_offset"}),
                                         ("SwiGLU without its +1", {"overrides": {
                                             "glu_linear_offset": 0.0}}),
                                         ("no sliding windows", {"overrides": {
                                             "window_size": None}})):
                        cases.append({"name": f"control/GPT-OSS {what}", "ckpt": ckpt,
                                      "hf": hf, "experts": "grouped_mm", **change})
                if arch == "DeepseekV3ForCausalLM":
                    cases.append({"name": "control/DeepSeek-V3 without routed_scaling_factor",
                                  "ckpt": ckpt, "hf": hf, "experts": "grouped_mm",
                                  "overrides": {"moe_router_topk_scaling_factor": None}})
                if arch == "Qwen3MoeForCausalLM":
                    cases.append({"name": "control/Qwen3-MoE softmax before top-k (not "
                                  "renormalised)", "ckpt": ckpt, "hf": hf,
                                  "experts": "grouped_mm",
                                  "overrides": {"moe_router_pre_softmax": True}})
    for name, (arch, layout) in EXTRA_LAYOUTS.items():
        cases.append({"name": f"{arch}/{name}/grouped_mm", "ckpt": checkpoint(arch, name, layout),
                      "hf": str(tiny_hf_models[arch]), "experts": "grouped_mm"})
    return cases


def train_runs(sft_assets, root: Path) -> tuple[str, dict]:
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(sft_assets["tokenizer"]))
    hf = make_random_hf_model(TRAIN_ARCH, root / "hf", seed=5, overrides=dict(vocab_size=vocab))
    c = {}
    for name, layout in {"ep1": ParallelLayout(), "ep2": ParallelLayout(1, 1, ep=2),
                         "tp2ep2": ParallelLayout(2, 1, ep=2),
                         "tp2pp2": ParallelLayout(2, 2), "ep4": ParallelLayout(1, 1, ep=4),
                         "pp2ep2": ParallelLayout(1, 2, ep=2)}.items():
        c[name] = str(root / name)
        convert_hf_to_megatron(hf, c[name], ConvertOptions(layout=layout, progress=False))

    def run(ckpt, **overrides):
        cfg = dict(load=ckpt, data_path=sft_assets["data"], seq_length=128, micro_batch_size=2,
                   global_batch_size=8, train_iters=5, lr=1e-3, lr_decay_style="constant",
                   no_progress=True, split="90,10,0", clip_grad=0.0, moe_aux_loss_coeff=0.01,
                   moe_z_loss_coeff=1e-3)
        return dict(cfg, **overrides)

    # --eval-generate at EP2: large random weights (varied tokens, decisive logits), loaded
    # from the HF directory, exported at iteration 2 for transformers' generate
    gen_hf = make_random_hf_model(TRAIN_ARCH, root / "gen-hf", seed=3,
                                  overrides=dict(vocab_size=vocab, initializer_range=0.3))
    # DeepSeek-V3 (MLA, sigmoid routing with an expert bias) at EP2: the bias updated at a
    # rate, and frozen
    ds = make_random_hf_model("DeepseekV3ForCausalLM", root / "hf-dsv3", seed=5,
                              overrides=dict(vocab_size=vocab))
    c["dsv3"] = str(root / "dsv3")
    convert_hf_to_megatron(ds, c["dsv3"], ConvertOptions(layout=ParallelLayout(1, 1, ep=2),
                                                         progress=False))
    save = root / "run"
    etp1 = dict(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2,
                expert_tensor_parallel_size=1, train_iters=3, use_distributed_optimizer=True)
    resume = dict(expert_model_parallel_size=2, train_iters=4, lr_decay_style="cosine",
                  lr_warmup_iters=1, use_distributed_optimizer=True)
    deepseek = dict(expert_model_parallel_size=2, train_iters=3, save_interval=3,
                    moe_aux_loss_coeff=0.0)
    return str(hf), {
        "dsv3_bias": run(c["dsv3"], save=str(root / "dsv3-bias"),
                         moe_router_bias_update_rate=BIAS_RATE, **deepseek),
        "dsv3_frozen": run(c["dsv3"], save=str(root / "dsv3-frozen"),
                           moe_router_freeze_expert_bias=True, **deepseek),
        # probe_clip: the gradient norm and clipping of global batch 0 first (clip_probe)
        "ep1": run(c["ep1"], probe_clip=CLIP),
        # megatron-core's per-expert loop: the reference for the grouped experts' gradients
        # (added into DDP's main_grad by the grouped GEMM's backward)
        "ep1_sequential": run(c["ep1"], moe_experts_impl="sequential"),
        # Megatron-FSDP (ZeRO-3) over the 4 data-parallel ranks, the grouped experts sharded
        # with the rest; saved at iteration 5 (the gathered rank file)
        # (a clip far above the norm: megatron-core computes the norm only when clipping)
        "fsdp_ep1": run(c["ep1"], use_megatron_fsdp=True,
                        data_parallel_sharding_strategy="optim_grads_params", clip_grad=1e3,
                        save=str(root / "fsdp-ep1"), save_interval=5),
        "tp2ep2": run(c["tp2ep2"], tensor_model_parallel_size=2, expert_model_parallel_size=2,
                      sequence_parallel=True, probe_clip=CLIP),
        "aux_ep2": run(c["ep2"], save=str(save), save_interval=2, moe_experts_impl="grouped_mm",
                       **resume),
        # from the save at iteration 2 (the tracker pointed back at it)
        "resumed": run(str(save), save=str(root / "run2"), moe_experts_impl="grouped_mm",
                       rewind_to=2, **resume),
        # ... under the other experts implementation: its optimizer state has another layout
        "resumed_sequential": run(str(save), save=str(root / "run3"),
                                  moe_experts_impl="sequential", rewind_to=2,
                                  expect_refusal=True, **resume),
        # LoRA with per-expert adapters: one curve at EP1, EP2, EP4, TP2 x EP2 (SP) and
        # PP2 x EP2 (EP4 and TP2 x EP2 with the distributed optimizer); the EP2 run is saved
        # for the checkpoint/export/reshard checks
        **{f"lora_{name}": run(c[ckpt], train_iters=3, lr=1e-2, lora_rank=4, lora_alpha=32,
                               **extra)
           for name, (ckpt, extra) in {
               "ep1": ("ep1", {}),
               "ep4": ("ep4", dict(expert_model_parallel_size=4,
                                   use_distributed_optimizer=True)),
               "tp2ep2": ("tp2ep2", dict(expert_model_parallel_size=2,
                                         tensor_model_parallel_size=2, sequence_parallel=True,
                                         use_distributed_optimizer=True)),
               "pp2ep2": ("pp2ep2", dict(expert_model_parallel_size=2,
                                         pipeline_model_parallel_size=2)),
               "ep2": ("ep2", dict(expert_model_parallel_size=2, save=str(root / "lora"),
                                   save_interval=2))}.items()},
        # the EP2 run's iteration-2 save resharded to EP4 (adapters only, fresh optimizer)
        "lora_resharded_ep4": run(str(root / "lora_ep4_from_ep2"), train_iters=3, lr=1e-2,
                                  lora_rank=4, lora_alpha=32, expert_model_parallel_size=4,
                                  reshard_from=[str(root / "lora"), 2, 4]),
        # routers and routed experts frozen: saved and exported bit for bit as loaded
        "frozen_ep2": run(c["ep2"], expert_model_parallel_size=2, train_iters=1,
                          moe_router_freeze=True, moe_experts_freeze=True,
                          save=str(root / "frozen"), save_interval=1),
        "recompute_ep2": run(c["ep2"], expert_model_parallel_size=2, train_iters=2,
                             recompute_granularity="full"),
        "bf16_ep2": run(c["ep2"], expert_model_parallel_size=2, train_iters=2, bf16=True),
        "generate_ep2": run(str(gen_hf), expert_model_parallel_size=2, train_iters=2,
                            lr=1e-4, eval_interval=2, eval_iters=1, eval_generate=2,
                            eval_generate_tokens=32, save=str(root / "gen"),
                            save_hf=str(root / "gen-export")),
        # sequence parallelism on a later pipeline stage: its padding mask is split there
        "tp2pp2": run(c["tp2pp2"], tensor_model_parallel_size=2,
                      pipeline_model_parallel_size=2, sequence_parallel=True, train_iters=3),
        # context parallelism with experts split over the CP x DP ranks, from the HF directory
        "cp2ep2_hf": run(str(hf), context_parallel_size=2, expert_model_parallel_size=2),
        # whole experts (ETP 1) under TP2 with SP, from the HF directory, saved every iteration
        # with the distributed optimizer, and resumed from 1 (step 2 uses the restored state)
        "tp2etp1ep2_hf": run(str(hf), probe_clip=CLIP, save=str(root / "etp1_run"),
                             save_interval=1, keep_last=0, **etp1),
        "etp1_resumed": run(str(root / "etp1_run"), rewind_to=1, **etp1),
    }


@pytest.fixture(scope="session")
def moe_launch(tiny_hf_models, sft_assets, tmp_path_factory):
    """``{"parity": {case: result}, "train": {run: history, hf_loss, hand_aux...}, "hf":
    training model dir, "root": where the runs are}`` of the one launch."""
    root = tmp_path_factory.mktemp("moe")
    hf, runs = train_runs(sft_assets, root)
    spec = {"out": str(root / "out.json"), "hf": hf, "runs": runs,
            "parity": parity_cases(tiny_hf_models, root)}
    (root / "spec.json").write_text(json.dumps(spec))
    proc = run_torchrun(4, WORKER, str(root / "spec.json"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = json.loads((root / "out.json").read_text())
    return {**out, "hf": hf, "root": root, "cases": spec["parity"], "bias_rate": BIAS_RATE}
