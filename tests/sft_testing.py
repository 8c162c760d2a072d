"""Helpers shared by tests (a uniquely named module: every test folder may have its own
``conftest``, so tests must not import from ``conftest``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from megatron.sft.bridge.architectures import supported_architectures

REPO = Path(__file__).resolve().parents[1]

# Every registered architecture, so a new table cannot go untested.
ARCHITECTURES = supported_architectures()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc: int, script: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` gloo ranks; returns the completed process (never raises)."""
    # --standalone: torchrun binds its rendezvous store to a free port itself; picking one
    # here and passing it on races with other tests launching at the same time (EADDRINUSE).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), str(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def run_tool(script: str, *args: str, env: dict | None = None, timeout: int = 300):
    """Run one of our CLIs the way a user does."""
    # Launchers run $PYTHON (default python3); point it at this interpreter, as an activated
    # virtualenv or the container's python would be.
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
                "PYTHON": sys.executable, **(env or {})}
    cmd = ([sys.executable] if script.endswith(".py") else ["bash"]) + [str(REPO / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=REPO)


def train_cli_args(ckpt, data, train_iters: int = 3, **extra) -> list[str]:
    """``tools/train_sft.py`` flags for a short run on the test assets; ``extra`` maps a flag to
    its value (``None`` for a switch) and overrides the defaults."""
    base = {"--load": ckpt, "--data-path": data, "--seq-length": "128",
            "--micro-batch-size": "2", "--global-batch-size": "4", "--lr": "1e-3",
            "--train-iters": str(train_iters), "--no-progress": None}
    base.update(extra)
    out = []
    for k, v in base.items():
        out += [k] if v is None else [k, str(v)]
    return out


def write_arithmetic_conversations(path: Path, count: int, seed: int) -> Path:
    """Multi-turn chats with checkable answers ("What is 3 plus 4?" -> "3 plus 4 is 7.")."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(count):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            msgs = [{"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
            if i % 3 == 0:
                msgs += [{"role": "user", "content": "And doubled?"},
                         {"role": "assistant", "content": f"Doubled it is {2 * (a + b)}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def _largest_tensor_mode():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        """Records the largest tensor any op creates (forward and backward): the probe behind
        "no s x s tensor" (attention) and "no whole logits" (chunked loss)."""

        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    return LargestTensor


def __getattr__(name):
    if name == "LargestTensor":  # built on first use: importing this module stays torch-free
        return _largest_tensor_mode()
    raise AttributeError(name)
