"""The environment self-check (what the Docker image runs) passes here and reports versions."""

import pytest

from sft_testing import run_tool


@pytest.mark.xdist_group("multiprocess")
def test_self_check_passes():
    r = run_tool("tools/self_check.py", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "megatron-core 0.16" in r.stdout
    # Every backend that can run on a CPU machine is checked against transformers.
    assert "model build + logits (local, sdpa attention): OK" in r.stdout
    assert "model build + logits (local, dense attention): OK" in r.stdout
    assert "varlen attention" not in r.stdout  # CUDA only: not attempted here
    assert r.stdout.rstrip().endswith("self-check passed")
