"""The GPU throughput harness runs end to end in its CPU dry-run mode, so it cannot rot between
GPU sessions: real launcher, real JSON log, one row per configuration."""

import json

import pytest

from sft_testing import run_tool


@pytest.mark.xdist_group("multiprocess")
def test_dry_run_reports_every_configuration(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_tool("benchmarks/bench_train_gpu.py", "--device", "cpu", "--tiny",
                    "--seq-lengths", "256", "--backends", "sdpa", "--recompute", "full",
                    "--chunked-loss", "on",  # the chunked loss through the real launcher
                    "--iters", "1", "--warmup", "1", "--documents", "300",
                    "--workdir", str(tmp_path / "work"), "--output-json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["backend"], r["recompute"], r["chunked_loss"], r["status"]) for r in results] == [
        ("sdpa", "full", "on", "ok")]
    assert all(r["tokens_per_s"] > 0 and r["ms_per_iter"] > 0 for r in results)
    assert "256 sdpa full on" in " ".join(proc.stdout.split())
