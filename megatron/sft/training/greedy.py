"""The bookkeeping of greedy decoding, without a model (pure: lists of ints): padding a batch of
prompts of different lengths, and which rows are still generating.

Right padding is what :mod:`~megatron.sft.training.generation` uses. Without a KV cache every
step runs the whole sequence again, and under causal attention a real token never sees the
padding after it, so right-padded rows need no attention mask, keep positions ``0..n-1`` and
give each row exactly the logits it would give alone; the next token is read at each row's own
last position. Left padding (the usual choice with a KV cache, all rows ending together) would
need a mask for the leading padding and positions shifted per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence


def round_up(n: int, multiple: int) -> int:
    """>>> round_up(5, 4), round_up(8, 4), round_up(3, 1)
    (8, 8, 3)"""
    return -(-n // multiple) * multiple


def pad_rows(rows: Sequence[Sequence[int]], multiple: int = 1, pad_id: int = 0,
             side: Literal["right", "left"] = "right") -> tuple[list[list[int]], list[int]]:
    """Pad ``rows`` to one length, a multiple of ``multiple`` (context parallelism cuts a row
    into ``2·CP`` chunks, sequence parallelism over TP); returns the rows and, per row, the
    position of its last real token (where its next token is read).

    >>> pad_rows([[1, 2, 3], [4]], multiple=2)
    ([[1, 2, 3, 0], [4, 0, 0, 0]], [2, 0])
    >>> pad_rows([[1, 2, 3], [4]], side="left")
    ([[1, 2, 3], [0, 0, 4]], [2, 2])
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every row needs at least one token")
    length = round_up(max(len(r) for r in rows), multiple)
    if side == "right":
        return ([list(r) + [pad_id] * (length - len(r)) for r in rows],
                [len(r) - 1 for r in rows])
    return [[pad_id] * (length - len(r)) + list(r) for r in rows], [length - 1] * len(rows)


@dataclass
class GreedyState:
    """Prompts and what has been generated for each; a row finishes when it emits one of
    ``stop_ids`` (kept as its last token, as ``transformers.generate`` keeps the EOS) or has
    ``max_new_tokens``.

    >>> s = GreedyState([[1], [2, 3]], max_new_tokens=3, stop_ids=(9,))
    >>> s.step([0, 1], [5, 9]); s.active(), s.sequences([0])
    ([0], [[1, 5]])
    >>> s.step([0], [6]); s.step([0], [7]); s.finished, s.generated, s.stopped
    (True, [[5, 6, 7], [9]], [False, True])
    """

    prompts: list[list[int]]
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()
    generated: list[list[int]] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {self.max_new_tokens}: generate at least one")
        self.prompts = [list(p) for p in self.prompts]
        self.generated = [[] for _ in self.prompts]
        self.stopped = [False for _ in self.prompts]

    def done(self, row: int) -> bool:
        return self.stopped[row] or len(self.generated[row]) >= self.max_new_tokens

    def active(self) -> list[int]:
        """Rows still generating, in order."""
        return [r for r in range(len(self.prompts)) if not self.done(r)]

    @property
    def finished(self) -> bool:
        return not self.active()

    def sequences(self, rows: Sequence[int]) -> list[list[int]]:
        """Prompt + generated tokens of ``rows``: the next forward's input."""
        return [self.prompts[r] + self.generated[r] for r in rows]

    def step(self, rows: Sequence[int], next_ids: Sequence[int]) -> None:
        """Append each row's next token; a stop token finishes its row."""
        if len(rows) != len(next_ids):
            raise ValueError(f"{len(next_ids)} next tokens for {len(rows)} rows")
        for r, t in zip(rows, next_ids):
            if self.done(r):
                raise ValueError(f"row {r} has already finished")
            self.generated[r].append(int(t))
            self.stopped[r] = int(t) in self.stop_ids
