"""Counters of one pre-tokenisation run, written as ``<prefix>_stats.json``.

The length histogram uses power-of-two buckets keyed by their upper bound, e.g. a 300-token
sample counts in ``"512"`` (257..512 tokens), a 1-token sample in ``"1"``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from megatron.sft.runtime.locks import temp_name

_POLICY = ("too_long", "no_loss_tokens")
_MAX_EXAMPLES = 20


@dataclass
class PreprocessStats:
    input: str = ""
    output_prefix: str = ""
    tokenizer: str = ""
    tokenizer_vocab_size: int = 0
    tokenizer_fingerprint: str = ""
    """Content hash of the tokenizer (``tokenizer_fingerprint``): training compares it with the
    model's tokenizer, which may have the same size and still be another one."""
    seq_length: int | None = None
    """``--seq-length`` of the run (``MAX_LEN``): longer samples were dropped or truncated."""
    truncate: bool = False
    max_token_id: int = -1
    """Largest token id written: training checks it against the model's vocabulary."""
    samples_read: int = 0
    samples_written: int = 0
    samples_truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    max_sample_tokens: int = 0
    dropped: Counter = field(default_factory=Counter)
    length_histogram: Counter = field(default_factory=Counter)
    notices: Counter = field(default_factory=Counter)
    """Things worth knowing that drop nothing, e.g. ``reasoning_not_rendered`` turns."""
    examples: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    token_dtype: str = ""

    @property
    def bad_records(self) -> int:
        """Drops caused by bad input (not by the length policy)."""
        return sum(n for reason, n in self.dropped.items() if reason not in _POLICY)

    def add_sample(self, n_tokens: int, n_loss: int, truncated: bool) -> None:
        self.samples_written += 1
        self.samples_truncated += truncated
        self.tokens += n_tokens
        self.loss_tokens += n_loss
        self.max_sample_tokens = max(self.max_sample_tokens, n_tokens)
        self.length_histogram[str(1 << max(0, (n_tokens - 1).bit_length()))] += 1

    def add_samples(self, n_tokens: np.ndarray, n_loss: np.ndarray, truncated: int) -> None:
        """``add_sample`` for many samples at once (arrays of per-sample counts)."""
        if len(n_tokens) == 0:
            return
        self.samples_written += len(n_tokens)
        self.samples_truncated += int(truncated)
        self.tokens += int(n_tokens.sum())
        self.loss_tokens += int(n_loss.sum())
        self.max_sample_tokens = max(self.max_sample_tokens, int(n_tokens.max()))
        # frexp(x)[1] == x.bit_length() for integers 0 <= x < 2**53: 300 -> 9 -> bucket "512"
        bits = np.frexp(np.asarray(n_tokens, dtype=np.float64) - 1)[1]
        buckets, counts = np.unique(1 << np.maximum(bits, 0).astype(np.int64), return_counts=True)
        for bucket, count in zip(buckets.tolist(), counts.tolist()):
            self.length_histogram[str(bucket)] += count

    def add_drop(self, reason: str, where_and_message: str) -> None:
        self.dropped[reason] += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"[{reason}] {where_and_message}")

    def to_dict(self) -> dict:
        rate = self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return {
            "input": self.input,
            "output_prefix": self.output_prefix,
            "tokenizer": self.tokenizer,
            "tokenizer_vocab_size": self.tokenizer_vocab_size,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "seq_length": self.seq_length,
            "truncate": self.truncate,
            "max_token_id": self.max_token_id,
            "samples_read": self.samples_read,
            "samples_written": self.samples_written,
            "samples_dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(sorted(self.dropped.items())),
            "notices": dict(sorted(self.notices.items())),
            "samples_truncated": self.samples_truncated,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "max_sample_tokens": self.max_sample_tokens,
            "token_dtype": self.token_dtype,
            "length_histogram": {k: self.length_histogram[k] for k in sorted(self.length_histogram, key=int)},
            "elapsed_s": round(self.elapsed_s, 3),
            "tokens_per_s": round(rate, 1),
            "samples_per_s": round(self.samples_read / self.elapsed_s, 1) if self.elapsed_s > 0 else 0.0,
            "drop_examples": self.examples,
        }

    def write_json(self, path: str, publish: bool = True) -> str:
        """Write ``path`` through a temp file; with ``publish=False`` leave it at the temp name
        (returned) for the caller to rename with the dataset it describes."""
        tmp = temp_name(path)
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
                f.write("\n")
        except BaseException:
            if os.path.lexists(tmp):
                os.remove(tmp)
            raise
        if publish:
            os.replace(tmp, path)
        return tmp
