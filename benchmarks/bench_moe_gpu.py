#!/usr/bin/env python3
"""Mixture-of-Experts speed on one GPU: the experts implementations against each other, and one
MoE layer against a dense MLP of the same active FLOPs.

Two parts (``--parts``):

- ``model``: SFT through the real launcher (``tools/train_sft.py`` under torchrun, one process)
  on a random Qwen3-30B-A3B-shaped model reduced to ``--layers`` layers (hidden 2048, 128
  experts, top-8, expert FFN 768, 32 heads, 4 KV heads, head_dim 128, vocab 151,936; bf16,
  distributed optimizer), packed rows of random tokens, once per ``--experts`` implementation:
  tokens/s, TFLOP/s per GPU and MFU counted on *active* parameters (top-k routed experts, router;
  ``megatron.sft.training.metrics``), peak memory. Medians after ``--warmup`` iterations.
- ``layer``: one megatron-core ``MoELayer`` (router, alltoall dispatch, experts, combine; the
  same layer spec the trainer builds) forward + backward on ``--layer-tokens`` tokens, against a
  dense SwiGLU MLP whose FFN is top-k x expert FFN (6144: the same matmul FLOPs per token).
  The goal is a ``grouped_mm`` MoE layer within 1.5x of that dense MLP.

  python benchmarks/bench_moe_gpu.py                          # both parts, every impl that runs
  python benchmarks/bench_moe_gpu.py --parts layer --experts grouped_mm sequential
  python benchmarks/bench_moe_gpu.py --device cpu --tiny      # dry run of the harness on CPU

``te`` (Transformer Engine's ``TEGroupedMLP``) is measured where it imports. Results also go to
``--output-json``. An out-of-memory configuration is reported as OOM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # bench_assets, when imported as a module

QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                     moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                     norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
                     rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=1000000.0,
                     router_aux_loss_coef=0.001, mlp_only_layers=[], decoder_sparse_step=1)
TINY = dict(QWEN3_30B_A3B, vocab_size=1024, hidden_size=64, intermediate_size=128,
            moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=4096)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="where to run (cpu: a dry run of the same measurements)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny MoE shape and short rows: checks the harness, measures nothing")
    p.add_argument("--parts", nargs="+", choices=["model", "layer"], default=["model", "layer"],
                   help="what to measure (default: both)")
    p.add_argument("--experts", nargs="+", default=None,
                   help="experts implementations (default: every one that runs here: te "
                        "grouped_mm sequential)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers of the reduced model (default 4: fits one 80 GB GPU "
                        "with optimizer state; tiny: 2)")
    p.add_argument("--seq-length", type=int, default=None, help="default 4096 (tiny: 256)")
    p.add_argument("--global-batch-size", type=int, default=4, help="rows per optimizer step")
    p.add_argument("--iters", type=int, default=6, help="measured iterations (model part)")
    p.add_argument("--warmup", type=int, default=3, help="iterations not measured")
    p.add_argument("--layer-tokens", type=int, default=None,
                   help="tokens through the layer micro-benchmark (default 8192; tiny: 256)")
    p.add_argument("--layer-repeats", type=int, default=20, help="timed layer repetitions")
    p.add_argument("--workdir", default=None, help="keep the model and data here (reused)")
    p.add_argument("--output-json", default=None, help="also write the results here")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per model configuration")
    return p.parse_args(argv)


def available_experts(device: str) -> list[str]:
    import torch

    from megatron.sft.model.moe.experts import ExpertsImplError, resolve_experts_impl
    from megatron.sft.model.layer_impl import transformer_engine_available

    linear = "te" if device == "cuda" and transformer_engine_available() else "local"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = []
    for choice in ("te", "grouped_mm", "sequential"):
        try:
            resolve_experts_impl(choice, linear, device, dtype)
        except ExpertsImplError:
            continue
        out.append(choice)
    return out


# ------------------------------------------------------------------------------ model part
def make_assets(work: Path, shape: dict, seq: int, rows: int) -> tuple[Path, str]:
    """A converted random MoE model and rows of seq/4 to seq random tokens (made once)."""
    import numpy as np

    from bench_assets import converted_random_model, random_token_dataset

    ckpt = converted_random_model(work, "Qwen3MoeForCausalLM", shape)
    lengths = np.random.default_rng(1).integers(seq // 4, seq + 1, size=rows)
    return ckpt, random_token_dataset(str(work / f"data-{seq}"), shape["vocab_size"], lengths)


def run_model(args, ckpt: Path, data: str, seq: int, experts: str, work: Path) -> dict:
    log = work / f"log-{seq}-{experts}.jsonl"
    log.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(REPO / "tools" / "train_sft.py"), "--load", str(ckpt), "--data-path", data,
           "--split", "100,0,0", "--seq-length", str(seq), "--micro-batch-size", "1",
           "--global-batch-size", str(args.global_batch_size),
           "--train-iters", str(args.warmup + args.iters), "--lr", "1e-5",
           "--lr-decay-style", "constant", "--use-distributed-optimizer", "--no-progress",
           "--moe-experts-impl", experts, "--log-json", str(log), "--log-interval", "1000"]
    if args.device == "cuda":
        cmd += ["--bf16"]
    if experts == "te":
        cmd += ["--transformer-impl", "transformer_engine"]
    env = dict(os.environ, PYTHONPATH=str(REPO),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    result = {"part": "model", "seq_length": seq, "experts": experts,
              "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        result["status"] = "OOM" if "out of memory" in text.lower() else "error"
        result["error"] = text.strip().splitlines()[-1][:300] if text.strip() else "no output"
        return result
    records = [json.loads(line) for line in log.read_text().splitlines()][args.warmup:]
    result["status"] = "ok"
    for key in ("tokens_per_s", "ms_per_iter", "tflops_per_gpu", "mfu", "max_memory_gib"):
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            result[key] = statistics.median(values) if key != "max_memory_gib" else max(values)
    return result


# ------------------------------------------------------------------------------ layer part
def _time(fn, repeats: int, cuda: bool) -> float:
    """Median milliseconds of ``fn()`` (forward + backward) after two warm-up calls."""
    import torch

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def run_layers(args, shape: dict, experts_impls: list[str]) -> list[dict]:
    """One MoE layer per experts implementation and the equal-FLOPs dense MLP, on this
    process's device, in a world of one."""
    import torch
    import torch.nn.functional as F

    from megatron.sft.runtime.distributed import initialize_distributed
    from megatron.sft.model.layer_impl import resolve_layer_impl
    from megatron.sft.runtime.layout import ParallelLayout

    info = initialize_distributed(ParallelLayout())
    cuda = info.device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.transformer_config import TransformerConfig

    h, e, k, f = (shape["hidden_size"], shape["num_experts"], shape["num_experts_per_tok"],
                  shape["moe_intermediate_size"])
    tokens = args.layer_tokens or (256 if args.tiny else 8192)
    results = []

    def config(**extra):
        return TransformerConfig(
            num_layers=1, hidden_size=h, ffn_hidden_size=k * f, num_attention_heads=8,
            gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
            params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=not cuda,
            bias_activation_fusion=False, gradient_accumulation_fusion=False, **extra)

    x = torch.randn(tokens, 1, h, device=info.device, dtype=dtype)
    grad = torch.randn_like(x)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=info.device))

    def measure(name, module, **extra):
        module = module.to(info.device)
        module.train()

        def step():
            xi = x.detach().requires_grad_()
            out = module(xi)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(grad)
        ms = _time(step, args.layer_repeats, cuda)
        flops = 3 * 2 * tokens * 3 * h * k * f  # fwd + bwd of the active expert matmuls
        r = {"part": "layer", "module": name, "tokens": tokens, "ms": round(ms, 3),
             "tflops": round(flops / ms / 1e9, 1), **extra}
        results.append(r)
        print(f"  layer {name:<22} {ms:9.3f} ms  {r['tflops']:7.1f} TFLOP/s (active)",
              flush=True)
        return ms

    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import build_module

    dense_spec = resolve_layer_impl("local" if not cuda else "auto", "auto",
                                    info.device.type).layer_spec(False).submodules.mlp
    dense_ms = measure(f"dense MLP (ffn {k * f})", build_module(dense_spec, config=config()))
    assert dense_spec.module is MLP or dense_spec.module.__name__.endswith("MLP")
    for impl_name in experts_impls:
        impl = resolve_layer_impl("transformer_engine" if impl_name == "te" else
                                  ("auto" if cuda else "local"), "auto", info.device.type,
                                  impl_name, dtype)
        moe_spec = impl.layer_spec(False, num_experts=e).submodules.mlp
        moe = build_module(moe_spec, config=config(
            num_moe_experts=e, moe_ffn_hidden_size=f, moe_router_topk=k,
            moe_router_pre_softmax=False, moe_router_dtype="fp32",
            moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=0.001,
            moe_grouped_gemm=impl_name == "te"))
        moe_ms = measure(f"MoE {impl_name} ({e} experts, top-{k})", moe)
        results[-1]["vs_dense"] = round(moe_ms / dense_ms, 2)
        print(f"    {impl_name}: {moe_ms / dense_ms:.2f}x the dense MLP (goal for grouped_mm: "
              "<= 1.5x)", flush=True)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron.sft.runtime.distributed import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu --tiny for a dry run", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    shape = dict(TINY if args.tiny else QWEN3_30B_A3B)
    shape["num_hidden_layers"] = args.layers or (2 if args.tiny else 4)
    seq = args.seq_length or (256 if args.tiny else 4096)
    experts = args.experts or available_experts(args.device)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {device}; torch {torch.__version__}; Qwen3-30B-A3B shape"
          f"{' (tiny)' if args.tiny else ''}: {shape['num_hidden_layers']} layers, hidden "
          f"{shape['hidden_size']}, {shape['num_experts']} experts top-"
          f"{shape['num_experts_per_tok']}, expert FFN {shape['moe_intermediate_size']}; experts "
          f"{' '.join(experts)}", flush=True)
    results = []
    if "model" in args.parts:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_moe_gpu_"))
        work.mkdir(parents=True, exist_ok=True)
        ckpt, data = make_assets(work, shape, seq, rows=200 if args.tiny else 400)
        print(f"{'seq':>6} {'experts':<11} {'tokens/s':>10} {'ms/iter':>9} {'TFLOP/s':>8} "
              f"{'MFU':>7} {'mem GiB':>8}", flush=True)
        for name in experts:
            r = run_model(args, ckpt, data, seq, name, work)
            results.append(r)
            if r["status"] != "ok":
                print(f"{seq:>6} {name:<11} {r['status']}: {r.get('error', '')}", flush=True)
                continue
            cells = [f"{seq:>6}", f"{name:<11}", f"{r['tokens_per_s']:>10.0f}",
                     f"{r['ms_per_iter']:>9.0f}",
                     f"{r['tflops_per_gpu']:>8.1f}" if "tflops_per_gpu" in r else f"{'n/a':>8}",
                     f"{100 * r['mfu']:>6.1f}%" if "mfu" in r else f"{'n/a':>7}",
                     f"{r['max_memory_gib']:>8.1f}" if "max_memory_gib" in r else f"{'n/a':>8}"]
            print(" ".join(cells), flush=True)
    if "layer" in args.parts:
        results += run_layers(args, shape, experts)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"device": device, "shape": shape,
                                                      "results": results}, indent=1))
    ok = all(r.get("status", "ok") == "ok" for r in results if r["part"] == "model")
    return 0 if results and ok else 1


if __name__ == "__main__":
    code = main()
    try:
        from megatron.sft.runtime.distributed import destroy_distributed

        destroy_distributed()
    except Exception:
        pass
    sys.exit(code)
