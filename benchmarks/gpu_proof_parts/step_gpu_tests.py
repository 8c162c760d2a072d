"""Step 2 (gpu tests): tests/gpu/ under pytest on the device."""

from __future__ import annotations

import re
import sys


def step_gpu_tests(proof, res: dict, deadline: float) -> None:
    if not proof.cuda:
        res["status"], res["key"] = "skipped", "skipped: no CUDA"
        return
    versions = proof.results["steps"]["setup"]["details"].get("versions", {})
    # no -x: most kernels here have never run on a GPU, and one failure must not hide the rest
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "tests/gpu"]
    workers = proof.args.gpu_test_workers
    if workers > 1 and versions.get("pytest-xdist", "missing") != "missing":
        cmd += ["-n", str(workers), "--dist", "loadgroup"]
    proc = proof.run(cmd, deadline, "gpu_tests.log")
    rc = proc.p.returncode
    summary = next((line for line in reversed(proc.tail)
                    if re.search(r"\d+ (passed|failed|error|skipped)|no tests ran", line)), "")
    summary = summary.strip("= ").strip()
    res["details"]["summary_line"] = summary
    res["details"]["failures"] = [line for line in proc.tail
                                  if line.startswith(("FAILED", "ERROR"))][:10]
    if proc.timed_out:
        res["status"] = "timeout"
        res["key"] = f"stopped at {res.get('allowed_s')}s; last: {proc.last_error()}"
    elif rc == 0 and not re.search(r"\d+ passed", summary):
        res["status"], res["key"] = "failed", f"no GPU test passed: {summary}"
    elif rc == 0:
        res["status"], res["key"] = "ok", summary
    else:
        res["status"] = "failed"
        res["key"] = "; ".join(res["details"]["failures"][:2]) or summary or \
            proc.last_error()
