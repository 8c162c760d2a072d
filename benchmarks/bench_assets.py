"""What the benchmarks build before they measure, written once: a converted random model, a
dataset of random tokens with a prompt/response mask, and the process's memory from /proc.

Random weights and tokens are enough for speed and memory: the kernels do not look at values.
Each maker leaves its result in the work directory and reuses it on a second call, so a rerun
with ``--workdir`` measures without rebuilding."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


def proc_status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``: kB there) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def converted_random_model(work: Path, architecture: str, shape: dict, dtype=None) -> Path:
    """``work/megatron``: a random HF model of ``shape`` converted at TP1 PP1 (made once)."""
    import torch

    from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
    from megatron.sft.bridge.random_hf_model import make_random_hf_model

    ckpt = work / "megatron"
    if not (ckpt / "latest_checkpointed_iteration.txt").exists():
        hf = make_random_hf_model(architecture, work / "hf", config=shape,
                                  dtype=dtype or torch.bfloat16)
        convert_hf_to_megatron(hf, ckpt, ConvertOptions(progress=False))
    return ckpt


def random_token_dataset(prefix: str, vocab_size: int, lengths: Iterable[int],
                         seed: int = 1) -> str:
    """A pre-tokenized dataset at ``prefix`` with one document per length (made once): random
    ids, the first fifth of each document a prompt (mask 0), the rest the learned response."""
    import numpy as np

    from megatron.sft.data.indexed_writer import IndexedPairWriter

    if not Path(prefix + "_text_document.idx").exists():
        rng = np.random.default_rng(seed)
        with IndexedPairWriter(prefix, vocab_size) as writer:
            for n in lengths:
                n = int(n)
                mask = np.zeros(n, np.uint8)
                mask[n // 5:] = 1
                writer.add(rng.integers(0, vocab_size, n, dtype=np.int64), mask)
            writer.commit()
    return prefix
