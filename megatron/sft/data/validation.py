"""Checks on a pre-tokenized dataset, cheap enough to run at open, before any training step.

- ``check_bin_size``: a ``.bin`` whose size is not what its ``.idx`` describes (a truncated
  copy, a full disk, files from two runs) is refused naming both files, instead of failing
  mid-run with "buffer is smaller than requested size".
- ``check_token_ids``: the largest token id, recorded in ``<prefix>_stats.json`` by the
  pre-tokenizer, must be below the model's vocabulary; data tokenized with another tokenizer
  otherwise trains on garbage (inf loss with TP, IndexError without). ``VocabularyGuard`` is
  the per-row backstop for data without stats.
- ``long_sample_report``: samples longer than ``max_position_embeddings``.

Pure (numpy, json); the trainer calls these through ``training/run_guard.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np


class DataValidationError(ValueError):
    """The dataset cannot be trained on as it is; the message says why and what to do."""


def check_bin_size(dataset, path_prefix: str) -> None:
    """``path_prefix.bin`` must hold exactly the bytes ``path_prefix.idx`` points into.

    Example: 3 samples of 5, 2, 4 uint16 tokens -> pointers [0, 10, 14] -> 22 bytes expected.
    """
    index = dataset.index
    n = len(index.sequence_lengths)
    itemsize = np.dtype(index.dtype).itemsize
    expected = (int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * itemsize
                if n else 0)
    bin_path = path_prefix + ".bin"
    actual = os.path.getsize(bin_path)
    if actual == expected:
        return
    if actual < expected:
        cause = (f"it is truncated ({expected - actual} bytes missing: an interrupted copy or a "
                 "full disk?). Copy it again, or re-run the pre-tokenization")
    else:
        cause = (f"it has {actual - expected} bytes more than the index describes: the .bin and "
                 ".idx come from different runs. Re-run the pre-tokenization")
    raise DataValidationError(
        f"{bin_path} is {actual} bytes but {path_prefix}.idx describes {n} samples of "
        f"{np.dtype(index.dtype).name} tokens needing {expected} bytes: {cause}"
    )


def read_stats(prefix: str) -> Optional[dict]:
    """``<prefix>_stats.json`` written by the pre-tokenizer, or None (e.g. Megatron-LM data)."""
    path = prefix + "_stats.json"
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@dataclass
class ModelVocabulary:
    """What token ids a model accepts: ``< size``; rows ``size..padded-1`` are padding that is
    never trained and is excluded from the softmax, so ids there are as wrong as ids past it."""

    size: int
    padded: int
    source: str = "the model"

    def describe(self) -> str:
        return (f"{self.source} has a vocabulary of {self.size} tokens "
                f"(embedding padded to {self.padded})")


def out_of_vocabulary_error(bin_path: str, sample: int, token_id: int, vocab: ModelVocabulary,
                            stats: Optional[dict]) -> DataValidationError:
    tokenizer = ""
    if stats and stats.get("tokenizer"):
        size = stats.get("tokenizer_vocab_size")
        tokenizer = (f"; the data was tokenized with {stats['tokenizer']}"
                     + (f" ({size} tokens)" if size else ""))
    return DataValidationError(
        f"{bin_path}: sample {sample} holds token id {token_id}, but {vocab.describe()}: "
        f"id {token_id} is not a token of this model{tokenizer}. The data was tokenized with "
        "another tokenizer; re-tokenize it with the model's own tokenizer "
        "(scripts/data/tokenize_dataset.sh HF_MODEL_DIR DATA MAX_LEN)"
    )


def first_id_at_least(dataset, bin_path: str, limit: int, chunk_tokens: int = 1 << 24
                      ) -> Optional[tuple[int, int]]:
    """``(sample, id)`` of the first token ``>= limit`` in the ``.bin``, read in chunks (only run
    once an error is certain, to name the sample)."""
    index = dataset.index
    tokens = np.memmap(bin_path, dtype=index.dtype, mode="r")
    itemsize = np.dtype(index.dtype).itemsize
    starts = np.asarray(index.sequence_pointers, dtype=np.int64) // itemsize
    for lo in range(0, len(tokens), chunk_tokens):
        block = np.asarray(tokens[lo:lo + chunk_tokens])
        hits = np.flatnonzero(block >= limit)
        if hits.size:
            pos = lo + int(hits[0])
            sample = int(np.searchsorted(starts, pos, side="right") - 1)
            return sample, int(block[hits[0]])
    return None


def check_token_ids(text_dataset, prefix: str, vocab: ModelVocabulary,
                    stats: Optional[dict]) -> list[str]:
    """Raise if the stats' ``max_token_id`` is outside ``vocab``; returns warnings (a tokenizer
    larger than the model whose extra ids this data happens not to use, or no recorded maximum,
    in which case each row is checked as it is read)."""
    warnings = []
    max_id = (stats or {}).get("max_token_id")
    if max_id is None or max_id < 0:
        warnings.append(f"{prefix}_stats.json does not record the largest token id (data from "
                        "another pre-tokenizer or an older version): token ids are checked "
                        "against the model's vocabulary as each batch is read")
        return warnings
    bin_path = prefix + "_text_document.bin"
    if max_id >= vocab.size:
        found = first_id_at_least(text_dataset, bin_path, vocab.size)
        sample, token_id = found if found else ("?", max_id)
        raise out_of_vocabulary_error(bin_path, sample, token_id, vocab, stats)
    tok_size = (stats or {}).get("tokenizer_vocab_size") or 0
    if tok_size > vocab.size:
        warnings.append(f"the tokenizer of {prefix} ({stats.get('tokenizer')}) has {tok_size} "
                        f"tokens but {vocab.describe()}; this data only uses ids up to {max_id}, "
                        "so training goes on, but check that it is the model's tokenizer")
    return warnings


class VocabularyGuard:
    """Per-row backstop: raise on the first id outside the vocabulary, naming file and sample.

    Costs one ``max`` over the row's tokens (``seq_length`` integers) per row.
    """

    def __init__(self, vocab: ModelVocabulary, bin_path: str, stats: Optional[dict] = None):
        self.vocab, self.bin_path, self.stats = vocab, bin_path, stats

    def check(self, ids: np.ndarray, sample: int) -> None:
        if len(ids) and int(ids.max()) >= self.vocab.size:
            bad = int(ids[np.argmax(ids >= self.vocab.size)])
            raise out_of_vocabulary_error(self.bin_path, sample, bad, self.vocab, self.stats)


def long_sample_report(positions: np.ndarray, max_positions: int, what: str,
                       seq_length: int) -> Optional[str]:
    """A sentence about the samples needing more positions than the model was trained on, or
    None. ``positions`` are input positions per sample (tokens - 1).

    Example: positions [10, 40, 70], max 32 -> "2 of 3 train samples are longer than ...".
    """
    over = positions > max_positions
    if not over.any():
        return None
    return (f"{int(over.sum())} of {len(positions)} {what} samples are longer than the model's "
            f"max_position_embeddings {max_positions} (longest {int(positions.max()) + 1} tokens, "
            f"--seq-length {seq_length}). RoPE models can extrapolate past it, but quality there "
            f"is not guaranteed; use --seq-length {max_positions} to skip such samples (samples "
            "longer than --seq-length are left out)")


def dropped_long_samples(ds, limit: int = 20000, seed: int = 0) -> Optional[dict]:
    """What skipping the samples longer than ``--seq-length`` costs: how many, and their share
    of the split's loss tokens (the learned ones). Exact when both the skipped and the kept
    samples number at most ``limit``; otherwise estimated from ``limit`` random ones of each.

    Example: 49 of 100 samples skipped holding 70% of the loss tokens ->
    ``{"samples": 49, "of": 100, "loss_token_share": 0.7, ...}``.
    """
    dropped = np.asarray(ds.too_long)
    if dropped.size == 0 or ds.mask is None:
        return None
    rng = np.random.default_rng(seed)

    def loss_tokens(ids: np.ndarray) -> tuple[float, bool]:
        estimated = ids.size > limit
        picked = rng.choice(ids, limit, replace=False) if estimated else ids
        total = float(sum(int(np.count_nonzero(ds.mask[int(i)][1:])) for i in picked))
        return total * ids.size / max(picked.size, 1), estimated

    lost, est1 = loss_tokens(dropped)
    kept, est2 = loss_tokens(np.asarray(ds.indices))
    total = int(dropped.size + ds.indices.size)
    return {"seq_length": int(ds.config.seq_length), "samples": int(dropped.size), "of": total,
            "sample_share": dropped.size / total,
            "loss_token_share": lost / (lost + kept) if lost + kept else 0.0,
            "estimated": est1 or est2}
