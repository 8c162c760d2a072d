"""The GPU proof (benchmarks/gpu_proof.py, issue 21) runs every step in its CPU dry-run mode, so
the one prepared GPU run cannot fail on the harness: setup, the throughput worker with its
profile table, the R1 recipe trained to 4, resumed to 6, exported and read back by transformers;
GPU-only parts say "skipped: no CUDA"; the summary table is the end of the output.

Kept cheap (the suite is near CI's limit): tiny models, 40 conversations, sequence 256, 2+2
iterations. The recipe's convert and tokenize scripts (and the export script) run their tools
in-process in --tiny with the arguments the scripts build (their real runs are tested in
tests/integration/bridge/test_roundtrip.py and tests/integration/data/
test_data_preprocess_pipeline.py); the two training runs are real torchrun launches, which no
other test makes of this recipe (tests/integration/training/test_recipes.py checks the command
it builds)."""

import json

import pytest

from sft_testing import run_tool


@pytest.mark.xdist_group("multiprocess")
def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "out"
    proc = run_tool("benchmarks/gpu_proof.py", "--device", "cpu", "--tiny", "--out", str(out),
                    "--trace", timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    lines = proc.stdout.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("Summary (gpu_proof"))
    summary = lines[start:]
    assert summary[-1].split()[0] == "total"
    table = " ".join(summary)
    for step in ("1 setup", "2 gpu tests", "3 throughput", "4 recipe", "5 moe", "6 kernels"):
        assert step in table

    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    status = {key: s["status"] for key, s in steps.items()}
    assert status["setup"] == status["throughput"] == status["recipe"] == "ok", status
    assert status["gpu_tests"] == "skipped" and steps["gpu_tests"]["key"] == "skipped: no CUDA"
    assert status["moe"] == "skipped" and steps["moe"]["key"] in (
        "skipped: MoE not in this build", "skipped: no CUDA (bench_moe_gpu.py takes --parts layer)")
    assert steps["kernels"] == {**steps["kernels"], "status": "skipped",
                                "key": "skipped: no CUDA (bench_attention_kernels.py)"}
    assert steps["setup"]["details"]["attention"]["sdpa"] == "ok"

    rows = {r["key"]: r for r in results["throughput"]}
    assert rows["256 sdpa none"]["status"] == "ok" and rows["256 sdpa none"]["tokens_per_s"] > 0
    for key in ("256 varlen none", "512 varlen selective", "256 flex none",
                "512 flex selective"):
        assert rows[key]["status"] == "skipped" and rows[key]["error"] == "skipped: no CUDA"
    profile = results["profile"]
    assert profile["status"] == "ok" and profile["config"] == "256 sdpa none"
    assert abs(sum(profile["shares"].values()) - 100) < 1
    assert profile["shares"]["attention"] > 0 and profile["shares"]["GEMMs"] > 0
    assert (out / "trace.json.gz").stat().st_size > 0

    recipe = steps["recipe"]["details"]
    assert recipe["train_4"]["iterations"] == [1, 2, 3, 4] and recipe["train_4"]["latest"] == "4"
    assert "at iteration 4" in recipe["train_6"]["resumed"]
    assert recipe["train_6"]["iterations"] == [1, 2, 3, 4, 5, 6]
    forward = recipe["export_and_forward"]
    assert forward["finite"] and forward["logits_shape"][-1] == recipe["prepare"]["vocab"]
    assert forward["architecture"] == "Qwen2ForCausalLM"
    # what the GPU machine sends back: at most 8 files, one of them the console log
    assert len([p for p in out.iterdir() if p.is_file()]) <= 7
