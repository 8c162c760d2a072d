#!/usr/bin/env python3
"""Peak memory and time of one MoE layer's routed experts, forward + backward, three ways (CPU
or one GPU): issue 29's check that holding each projection of the local experts as one 3-D
parameter costs no more memory than megatron-core's per-expert loop.

- ``sequential``: megatron-core's ``SequentialMLP`` (one matmul per expert and projection);
- ``stacking``:   the previous ``grouped_mm`` experts: ``SequentialMLP``'s per-expert
  parameters, stacked into ``[E, out, in]`` on every forward for the grouped GEMM (autograd
  keeps the stacked copy for the backward pass);
- ``grouped``:    ``GroupedMMExperts`` today: the 3-D parameters, read in place.

What is run is the experts module alone, on tokens as the dispatcher hands them (sorted by
expert, ``tokens_per_expert`` drawn at random, every expert receiving some): router and token
dispatch are the same code under every implementation, so leaving them out makes the memory
comparison stricter, not looser. The default shape is one Qwen3-30B-A3B MoE layer at EP2 (64
local experts, hidden 2048, expert FFN 768, SwiGLU). Each implementation runs in its own
process, so one's allocations cannot hide in another's peak:

- peak: CUDA ``max_memory_allocated`` over the timed steps; on CPU the process' peak resident
  set over them (``VmHWM``, reset through ``/proc/self/clear_refs`` before the timed steps)
  less its resident set before the module was built (Python, torch and megatron-core), so
  both count what the experts hold: weights, gradients, activations and transients;
- saved: bytes autograd keeps for the backward pass beyond the parameters themselves
  (distinct storages, ``saved_tensors_hooks``);
- ms: median forward + backward of ``--repeats`` steps after one warm-up.

The module is wrapped in megatron-core's ``DistributedDataParallel`` (a world of one process),
as the trainer wraps a model chunk: its fp32 gradient buffers (``main_grad``, allocated at
wrapping, so in every implementation's baseline) and the hooks that add each parameter's
gradient into them are what a training step runs.

The outputs and input gradients of the three are compared at the end (relative difference of
their sums of squares), so a fast but wrong implementation shows.

  python benchmarks/bench_grouped_experts.py                      # CPU here: fp32, 4096 rows
  python benchmarks/bench_grouped_experts.py --device cuda        # bf16, 16384 rows
  python benchmarks/bench_grouped_experts.py --tiny               # a check of the harness
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

IMPLS = ("sequential", "stacking", "grouped")
#: the peak-memory goal: grouped within 5 % of sequential
GOAL = 1.05


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="parameters and activations (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--experts", type=int, default=64, help="local experts (default 64)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (default 2048)")
    p.add_argument("--ffn", type=int, default=768, help="expert FFN size (default 768)")
    p.add_argument("--tokens", type=int, default=None,
                   help="routed token rows through the experts (tokens x top-k; default "
                        "16384 on cuda, 4096 on cpu)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps (default 10 on cuda, 3 on cpu)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                   help="implementations to measure (default: all three)")
    p.add_argument("--tiny", action="store_true",
                   help="8 experts, hidden 64, FFN 32, 256 rows: checks the harness only")
    p.add_argument("--output-json", default=None, help="also write the results here")
    p.add_argument("--child", choices=IMPLS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no GPU is visible here (torch.cuda.is_available() is False)")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.tiny:
        args.experts, args.hidden, args.ffn = 8, 64, 32
        args.tokens = args.tokens or 256
    args.tokens = args.tokens or (16384 if args.device == "cuda" else 4096)
    args.repeats = args.repeats or (10 if args.device == "cuda" else 3)
    for name in ("experts", "hidden", "ffn", "tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.tokens < args.experts:
        p.error(f"--tokens {args.tokens} < --experts {args.experts}: every expert should "
                "receive tokens")
    return args


# ------------------------------------------------------------------------------ one process
def _world_of_one() -> None:
    from megatron.sft.runtime.distributed import initialize_distributed
    from megatron.sft.runtime.layout import ParallelLayout

    initialize_distributed(ParallelLayout(), seed=0)  # CPU: megatron-core's cuda calls redirected


def _stacking_class():
    """The ``grouped_mm`` experts as they were before the 3-D parameters: per-expert weights,
    stacked on every forward (the baseline this benchmark exists to retire)."""
    import torch
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron.sft.model.moe.experts import grouped_linear
    from megatron.sft.model.moe.grouped_mm import _glu

    class StackingExperts(SequentialMLP):
        def forward(self, x, tokens_per_expert, probs):
            fc1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])
            fc2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])
            offs = torch.cumsum(tokens_per_expert.to(x.device), 0).to(torch.int32)
            h = _glu(self.config, grouped_linear(x, fc1, offs))
            h = (h * probs.unsqueeze(-1)).to(h.dtype)
            return grouped_linear(h, fc2, offs), None

    return StackingExperts


def _build(impl: str, args, dtype, device):
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron.sft.model.moe.grouped_mm import GroupedMMExperts

    cls = {"sequential": SequentialMLP, "stacking": _stacking_class(),
           "grouped": GroupedMMExperts}[impl]
    config = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
        num_attention_heads=8, num_moe_experts=args.experts, moe_ffn_hidden_size=args.ffn,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        use_cpu_initialization=device.type == "cpu", perform_initialization=False,
        params_dtype=dtype, bias_activation_fusion=False, gradient_accumulation_fusion=False)
    spec = get_moe_module_spec(use_te=False, num_experts=args.experts).submodules.experts
    module = cls(args.experts, config, spec.submodules, pg_collection=get_default_pg_collection())
    module.to(device)
    # the same weights under every implementation, by checkpoint name
    with torch.no_grad():
        state = module.state_dict()
        for e in range(args.experts):
            gen = torch.Generator().manual_seed(e)
            for linear in ("linear_fc1", "linear_fc2"):
                w = state[f"local_experts.{e}.{linear}.weight"]
                w.copy_((torch.randn(w.shape, generator=gen) * 0.02).to(w.dtype))
    # wrapped as the trainer wraps a model chunk: fp32 gradient buffers (main_grad), the
    # gradient hooks that add each parameter's gradient into them
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                        use_distributed_optimizer=False,
                                        average_in_collective=False)
    return DistributedDataParallel(config=config, ddp_config=ddp, module=module)


def _inputs(args, dtype, device):
    import torch

    gen = torch.Generator().manual_seed(1234)
    # every expert gets at least one row, the rest at random
    extra = torch.multinomial(torch.ones(args.experts), args.tokens - args.experts,
                              replacement=True, generator=gen)
    tokens = torch.bincount(extra, minlength=args.experts) + 1
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype)
    probs = torch.rand(args.tokens, generator=gen).to(device, torch.float32)
    dy = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype)
    return tokens, x, probs, dy


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _memory(device) -> dict:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated(),
                "now_bytes": torch.cuda.memory_allocated()}
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return {"peak_bytes": fields.get("VmHWM"), "now_bytes": fields.get("VmRSS")}


def _step(module, tokens, x, probs, dy, measure_saved: bool = False):
    """One forward + backward; with ``measure_saved`` also the bytes autograd keeps for the
    backward pass beyond the parameters themselves (distinct storages)."""
    import torch

    xi = x.detach().requires_grad_()
    own = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    if measure_saved:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, _ = module(xi, tokens, probs)
    else:
        out, _ = module(xi, tokens, probs)
    out.backward(dy)
    return out.detach(), xi.grad, sum(saved.values())


def run_child(args) -> dict:
    import torch

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    _world_of_one()
    baseline = _memory(device)["now_bytes"] if device.type == "cpu" else 0
    module = _build(args.child, args, dtype, device)
    tokens, x, probs, dy = _inputs(args, dtype, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    out, gx, saved = _step(module, tokens, x, probs, dy, measure_saved=True)  # warm-up
    check = {"out_sq": float(out.double().square().sum()),
             "dx_sq": float(gx.double().square().sum())}
    del out, gx
    before = _memory(device)
    _reset_peak(device)
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out, gx, _ = _step(module, tokens, x, probs, dy)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
        del out, gx
    mem = _memory(device)
    peak = mem["peak_bytes"] - baseline if mem["peak_bytes"] is not None else None
    return {"impl": args.child, "ms": statistics.median(times), "peak_bytes": peak,
            "before_bytes": before["now_bytes"] - baseline, "saved_bytes": saved,
            "weight_bytes": weight_bytes, **check}


# ------------------------------------------------------------------------------ driver
def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.3f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        result = run_child(args)
        Path(args.child_out).write_text(json.dumps(result))
        return 0
    shape = (f"{args.experts} local experts, hidden {args.hidden}, FFN {args.ffn}, "
             f"{args.tokens} rows, {args.dtype}, {args.device}")
    print(f"experts forward + backward: {shape}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for impl in args.impls:
            out = Path(tmp) / f"{impl}.json"
            cmd = [sys.executable, __file__, "--child", impl, "--child-out", str(out),
                   "--device", args.device, "--dtype", args.dtype, "--experts", str(args.experts),
                   "--hidden", str(args.hidden), "--ffn", str(args.ffn),
                   "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
            env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0 or not out.exists():
                text = (proc.stdout + proc.stderr).strip()
                status = "OOM" if "out of memory" in text.lower() else "error"
                results.append({"impl": impl, "status": status,
                                "error": text.splitlines()[-1][:300] if text else "no output"})
                print(f"  {impl}: {status}: {results[-1]['error']}", flush=True)
                continue
            results.append({"status": "ok", **json.loads(out.read_text())})
            r = results[-1]
            print(f"  {impl:<10} {r['ms']:9.1f} ms  peak {_gib(r['peak_bytes'])} GiB  "
                  f"(weights {_gib(r['weight_bytes'])}, before the step "
                  f"{_gib(r['before_bytes'])})  saved for backward {_gib(r['saved_bytes'])} GiB",
                  flush=True)
    ok = {r["impl"]: r for r in results if r["status"] == "ok"}
    summary = {}
    ref = ok.get("sequential")
    if ref is not None:
        for impl, r in ok.items():
            summary[impl] = {
                "peak_vs_sequential": r["peak_bytes"] / ref["peak_bytes"]
                if r["peak_bytes"] and ref["peak_bytes"] else None,
                "time_vs_sequential": r["ms"] / ref["ms"],
                "out_rel_diff": abs(r["out_sq"] - ref["out_sq"]) / ref["out_sq"],
                "dx_rel_diff": abs(r["dx_sq"] - ref["dx_sq"]) / ref["dx_sq"]}
        print("\nimpl        time/seq  peak/seq  |out|^2 rel.diff  |dx|^2 rel.diff")
        for impl, s in summary.items():
            peak = "n/a" if s["peak_vs_sequential"] is None else f"{s['peak_vs_sequential']:.3f}"
            print(f"{impl:<10} {s['time_vs_sequential']:9.2f} {peak:>9}  "
                  f"{s['out_rel_diff']:16.1e} {s['dx_rel_diff']:16.1e}")
        grouped = summary.get("grouped", {}).get("peak_vs_sequential")
        if args.tiny:
            print("\n(--tiny checks the harness: at this size the peaks are allocator noise)")
        elif grouped is not None:
            print(f"\ngoal: grouped peak <= {GOAL:.2f} x sequential: "
                  f"{'met' if grouped <= GOAL else 'NOT met'} ({grouped:.3f})")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(
            {"shape": shape, "results": results, "summary": summary}, indent=1))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
