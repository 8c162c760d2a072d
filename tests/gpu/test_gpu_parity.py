"""GPU path (NCCL, CUDA tensors, no CPU mode): converted checkpoints match transformers on the
GPU. Runs where CUDA is present (the NVIDIA container, or a lent GPU machine); CPU CI covers the
same code through gloo in tests/integration."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sft_testing import ARCHITECTURES, REPO
from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.bridge.random_hf_model import make_random_hf_model
from megatron.sft.runtime.ports import free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _parity(ckpt, hf, out, atol, impl="auto", backend="auto"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", str(free_port()), str(REPO / "tools" / "check_hf_parity.py"),
           "--load", str(ckpt), "--hf-model", str(hf), "--atol", str(atol),
           "--transformer-impl", impl, "--attention-backend", backend, "--seq-length", "64",
           "--output-json", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fp32_logits_match_on_gpu(arch, tmp_path):
    hf = make_random_hf_model(arch, tmp_path / "hf", seed=3)
    convert_hf_to_megatron(hf, tmp_path / "mg", ConvertOptions(progress=False))
    proc, result = _parity(tmp_path / "mg", hf, tmp_path / "r.json", atol=1e-4)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert result["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("backend", ["auto", "varlen", "flex", "sdpa", "dense"])
def test_bf16_logits_close_on_gpu(backend, tmp_path):
    hf = make_random_hf_model("Qwen2ForCausalLM", tmp_path / "hf", seed=4, dtype=torch.bfloat16)
    convert_hf_to_megatron(hf, tmp_path / "mg", ConvertOptions(progress=False))
    proc, result = _parity(tmp_path / "mg", hf, tmp_path / "r.json", atol=0.1, backend=backend)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    print(result)
