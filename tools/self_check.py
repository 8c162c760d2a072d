#!/usr/bin/env python3
"""Check an environment (e.g. inside the Docker image) before a long job:

- versions of torch / CUDA, megatron-core, Transformer Engine, Apex, transformers;
- megatron.core and megatron.sft import side by side (namespace package);
- a tiny random Qwen2 model converted to Megatron builds on this machine (GPU if present, with
  the Transformer Engine spec when TE imports, else the local spec) and its logits match
  transformers.

  docker run --gpus all --rm megatron-sft python tools/self_check.py
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # report, do not crash: the point is to show what is missing
        return f"missing ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    return str(getattr(mod, "__version__", "present"))


def main() -> int:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    print(f"python        {sys.version.split()[0]}")
    print(f"torch         {torch.__version__} (CUDA {torch.version.cuda}, "
          f"{torch.cuda.device_count()} GPU(s){': ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''})")
    for name, module in [("megatron-core", "megatron.core"), ("megatron-sft", "megatron.sft"),
                         ("transformer-engine", "transformer_engine"), ("apex", "apex"),
                         ("transformers", "transformers")]:
        print(f"{name:<13} {version(module)}")
    from megatron.sft.model.attention import attention_backends
    from megatron.sft.model.layer_impl import LayerImplError, resolve_layer_impl

    # Every (layer implementation, attention backend) pair that can run on this machine.
    impls = []
    for impl in ("local", "transformer_engine"):
        for backend in (spec.name for spec in attention_backends()):
            try:
                resolve_layer_impl(impl, backend)
            except LayerImplError:
                continue
            impls.append((impl, backend))
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
        from megatron.sft.bridge.random_hf_model import make_random_hf_model

        hf = make_random_hf_model("Qwen2ForCausalLM", Path(tmp) / "hf", seed=0)
        convert_hf_to_megatron(hf, Path(tmp) / "mg", ConvertOptions(progress=False))
        # One process per pair, all at once: each spends most of its time importing.
        procs = []
        for impl, backend in impls:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", "1", str(REPO / "tools" / "check_hf_parity.py"),
                   "--load", str(Path(tmp) / "mg"), "--hf-model", str(hf),
                   "--transformer-impl", impl, "--attention-backend", backend, "--atol", "1e-3"]
            env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env))
        for (impl, backend), proc in zip(impls, procs):
            out, err = proc.communicate()
            line = next((ln for ln in out.splitlines() if ln.startswith("[parity]")),
                        err.strip().splitlines()[-1] if err.strip() else "no output")
            ok = proc.returncode == 0
            failures += not ok
            print(f"model build + logits ({impl}, {backend} attention): "
                  f"{'OK' if ok else 'FAIL'}  {line}")
    print("self-check " + ("passed" if not failures else f"FAILED ({failures})"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
