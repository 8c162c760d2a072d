"""Step 6 (kernels): forward + backward of the packed attention kernels at the new families'
head shapes (GPT-OSS sinks, DeepSeek-V3 MLA) beside the dense-model shape, varlen and flex at
4k and 16k (``bench_attention_kernels.py``)."""

from __future__ import annotations

import sys

from gpu_proof_parts.processes import StepTimeout, _read_json
from gpu_proof_parts.settings import REPO

BENCH = REPO / "benchmarks" / "bench_attention_kernels.py"


def step_kernels(proof, res: dict, deadline: float) -> None:
    out = proof.paths["state"] / "kernels.json"
    out.unlink(missing_ok=True)
    flags = ["--output-json", str(out), "--iters", "3", "--warmup", "1"]
    if not proof.cuda:
        # A GPU measurement with its own CPU dry run (--device cpu --tiny); here only check
        # that it takes these flags, without importing the model code.
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_attention_kernels", BENCH)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            module.parse_args(flags)
        except SystemExit:
            res["status"], res["key"] = "failed", "bench_attention_kernels.py refused its flags"
            return
        res["status"], res["key"] = "skipped", "skipped: no CUDA (bench_attention_kernels.py)"
        return
    proc = proof.run([sys.executable, str(BENCH)] + flags, deadline, "kernels.log")
    data = _read_json(out)
    if proc.timed_out:
        raise StepTimeout("bench_attention_kernels.py did not finish")
    if data is None:
        res["status"], res["key"] = "failed", f"bench_attention_kernels.py: {proc.last_error()}"
        return
    rows = data.get("results", [])
    res["details"]["results"] = rows
    res["status"] = "ok" if any(r.get("status") == "ok" for r in rows) else "failed"
    res["key"] = "; ".join(
        f"{r['shape']} {r['backend']} {r['seq'] // 1024}k "
        + (f"{r['tflops']:.0f} TF/s" if r.get("status") == "ok" else r.get("status", "?"))
        for r in rows if r["shape"] in ("gqa", "sinks", "mla")) or "no results"
