"""Helpers shared by tests (a uniquely named module: every test folder may have its own
``conftest``, so tests must not import from ``conftest``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from megatron.sft.bridge.architectures import supported_architectures

REPO = Path(__file__).resolve().parents[1]

# Every registered architecture, so a new table cannot go untested.
ARCHITECTURES = supported_architectures()


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


@contextlib.contextmanager
def small_filesystem(path: Path, size: str, options: str = ""):
    """A real filesystem of ``size`` (e.g. ``"1M"``) mounted at ``path`` for disk-full tests: a
    tmpfs, which needs root (as on CI and the development machines); skipped elsewhere.
    ``options``: more mount options, e.g. ``"ro"`` (root writes anywhere else)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        import pytest

        pytest.skip(f"cannot mount a {size} tmpfs at {path}: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


BATCH_WORKER = REPO / "tests" / "integration" / "training" / "batch_worker.py"


class Batch:
    """The results of one ``batch_worker.py`` launch: ``batch["name"]`` is a scenario's result,
    or a failure that shows that scenario's traceback."""

    def __init__(self, root: Path, results: dict, log: str):
        self.root, self._results, self.log = root, results, log

    def __getitem__(self, name: str):
        r = self._results[name]
        import pytest

        if isinstance(r, dict) and "error" in r:
            pytest.fail(f"scenario {name!r} failed:\n{r['error']}", pytrace=False)
        if r is None:
            pytest.fail(f"scenario {name!r} wrote no result; the launch said:\n{self.log}",
                        pytrace=False)
        return r

    def latest_before(self, name: str) -> str:
        return (self.root / f"{name}.json.latest_before").read_text()


def run_batch(root: Path, nproc: int, scenarios: dict[str, dict]) -> Batch:
    """Run every scenario (``{name: train_worker/lora_worker spec}``) in one launch of ``nproc``
    ranks; each scenario's ``out`` is ``root/<name>.json``."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    listed = [{**spec, "name": name, "out": str(root / f"{name}.json")}
              for name, spec in scenarios.items()]
    (root / "batch.json").write_text(json.dumps({"scenarios": listed}))
    proc = run_torchrun(nproc, BATCH_WORKER, str(root / "batch.json"), timeout=1200)
    log = proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, log
    results = {}
    for name in scenarios:
        path = root / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.exists() else None
    return Batch(root, results, log)
def hf_greedy(hf_dir, prompt_ids, max_new_tokens, stop_ids):
    """``transformers``' greedy tokens for one prompt (alone: no padding) and the smallest gap
    between the best and the second-best logit over the steps: the margin by which a tie is
    avoided (megatron-core's and transformers' logits differ by ~1e-6 in fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = model.generate(torch.tensor([list(prompt_ids)]), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=list(stop_ids), pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    top2 = [s[0].float().topk(2).values for s in out.scores]
    return out.sequences[0, len(prompt_ids):].tolist(), min(float(v[0] - v[1]) for v in top2)


def check_generations_against_hf(generations, hf_dir, sft_assets, new_tokens: int) -> None:
    """A run's ``--eval-generate 2`` record (on ``sft_assets``' data, split 90,10,0) equals
    ``transformers.generate(do_sample=False)`` on ``hf_dir`` token for token, for
    ``new_tokens`` varied tokens, with no near-tie on the way."""
    from transformers import AutoTokenizer

    from megatron.sft.data.eval_prompts import renderer_for, stop_token_ids
    from megatron.sft.data.sft_dataset import SFTDatasetConfig, build_sft_datasets
    from megatron.sft.training.eval_generation import validation_prompts

    _, valid, _ = build_sft_datasets(SFTDatasetConfig(data_path=sft_assets["data"],
                                                      seq_length=128, split="90,10,0"))
    prompts = validation_prompts(valid, 2)
    stops = stop_token_ids(renderer_for(AutoTokenizer.from_pretrained(sft_assets["tokenizer"])))
    assert len(generations) == len(prompts) == 2
    for prompt, g in zip(prompts, generations):
        ref, margin = hf_greedy(hf_dir, prompt.ids, new_tokens, stops)
        assert g["token_ids"] == ref, (g, ref)
        assert len(ref) == new_tokens and len(set(ref)) >= new_tokens // 2  # varied, no stop
        # no near-tie: fp32 logits of megatron-core and transformers differ by < 1e-5 on these
        # models (the logits parity tests), 10x less than the smallest best-vs-second gap
        assert margin > 1e-4, margin
        assert g["prompt_tokens"] == len(prompt.ids) and not g["stopped"]


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
