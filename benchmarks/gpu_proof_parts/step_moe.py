"""Step 5 (moe): the MoE layer micro-benchmark, grouped-mm vs sequential vs dense; then, when
the step's time allows, the experts' peak memory and time as 3-D parameters against the
per-expert loop and per-forward stacking (``bench_grouped_experts.py``)."""

from __future__ import annotations

import sys

import time

from gpu_proof_parts.processes import StepTimeout, _read_json
from gpu_proof_parts.settings import REPO


def step_moe(proof, res: dict, deadline: float) -> None:
    bench = REPO / "benchmarks" / "bench_moe_gpu.py"
    if not bench.exists():
        res["status"], res["key"] = "skipped", "skipped: MoE not in this build"
        return
    out = proof.paths["state"] / "moe.json"
    out.unlink(missing_ok=True)
    flags = ["--parts", "layer", "--output-json", str(out)]
    if not proof.cuda:
        # A GPU measurement (it has its own CPU dry-run test): here only check that it
        # takes these flags, without the seconds of a megatron-core import.
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_moe_gpu", bench)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            module.parse_args(flags + ["--device", "cpu"])
        except SystemExit:
            res["status"] = "failed"
            res["key"] = f"bench_moe_gpu.py does not take {' '.join(flags[:2])} --output-json"
            return
        grouped = REPO / "benchmarks" / "bench_grouped_experts.py"
        if grouped.exists():
            spec = importlib.util.spec_from_file_location("bench_grouped_experts", grouped)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
                module.parse_args(GROUPED_FLAGS + ["--device", "cpu", "--output-json", "x"])
            except SystemExit:
                res["status"] = "failed"
                res["key"] = f"bench_grouped_experts.py does not take {' '.join(GROUPED_FLAGS)}"
                return
        res["status"] = "skipped"
        res["key"] = f"skipped: no CUDA (bench_moe_gpu.py takes {' '.join(flags[:2])})"
        return
    proc = proof.run([sys.executable, str(bench)] + flags, deadline, "moe.log")
    data = _read_json(out)
    if proc.timed_out:
        raise StepTimeout("bench_moe_gpu.py did not finish")
    if proc.p.returncode != 0 or data is None:
        res["status"], res["key"] = "failed", f"bench_moe_gpu.py: {proc.last_error()}"
        return
    layers = [r for r in data.get("results", []) if r.get("part") == "layer"]
    res["details"]["results"] = layers
    res["status"] = "ok"
    res["key"] = "; ".join(
        f"{r.get('module', '?')} {r.get('ms', float('nan')):.2f} ms"
        + (f" ({r['vs_dense']:.2f}x dense)" if r.get("vs_dense") is not None else "")
        for r in layers) or "no layer results"
    _grouped_experts(proof, res, deadline)


#: the grouped-experts benchmark on the GPU: its default shape (64 local experts of
#: Qwen3-30B-A3B, 16384 rows, bf16), against the per-expert loop only, fewer timed steps
GROUPED_FLAGS = ["--repeats", "5", "--impls", "sequential", "grouped"]
#: seconds it needs (sequential and grouped: two processes importing megatron-core, a few
#: steps each)
GROUPED_SECONDS = 30


def _grouped_experts(proof, res: dict, deadline: float) -> None:
    """Adds the grouped experts' peak memory and time (vs sequential) to the step's result
    when the time left allows; never fails the step (the layer benchmark is its verdict)."""
    bench = REPO / "benchmarks" / "bench_grouped_experts.py"
    if not bench.exists() or deadline - time.time() < GROUPED_SECONDS:
        res["details"]["grouped_experts"] = "not run: no time left in the step"
        return
    out = proof.paths["state"] / "grouped_experts.json"
    out.unlink(missing_ok=True)
    proc = proof.run([sys.executable, str(bench), "--device", "cuda", *GROUPED_FLAGS,
                      "--output-json", str(out)], deadline, "grouped_experts.log")
    data = _read_json(out)
    if proc.timed_out or data is None:
        res["details"]["grouped_experts"] = f"not finished: {proc.last_error()}"
        return
    res["details"]["grouped_experts"] = data
    grouped = data.get("summary", {}).get("grouped", {})
    if grouped.get("peak_vs_sequential") is not None:
        res["key"] += (f"; grouped experts peak {grouped['peak_vs_sequential']:.3f}x, time "
                       f"{grouped['time_vs_sequential']:.2f}x sequential")
