"""Step 5 (moe): the MoE layer micro-benchmark, grouped-mm vs sequential vs dense."""

from __future__ import annotations

import sys

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
