"""Learned token ranges and loss masks from character spans and token offsets.

A token is learned when it overlaps a character span to learn; optionally the end-of-turn token
that starts exactly where a span ends is learned too. Token offsets come either as an array
(``ArrayOffsets``) or straight from a ``tokenizers.Encoding`` (``EncodingOffsets``, no per-token
Python objects); both answer the same four questions, with identical results.

Worked example (4 tokens, learn characters 3..9, token 3 is an end-of-turn marker)::

    offsets [[0, 3], [3, 5], [5, 9], [9, 19]]  spans [(3, 9)]  ->  ranges [(1, 4)]
    mask_from_ranges(4, [(1, 4)])              ->  [0, 1, 1, 1]
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import numpy as np


class ArrayOffsets:
    """Token offsets held as an ``(n, 2)`` array; the searches are ``np.searchsorted``."""

    def __init__(self, offsets: np.ndarray):
        self.starts, self.ends = offsets[:, 0], offsets[:, 1]

    def __len__(self) -> int:
        return len(self.starts)

    def start(self, j: int) -> int:
        return int(self.starts[j])

    def end(self, j: int) -> int:
        return int(self.ends[j])

    def ends_right(self, x: int) -> int:
        """Number of leading tokens that end at or before character ``x``."""
        return int(self.ends.searchsorted(x, side="right"))

    def starts_left(self, x: int) -> int:
        """Number of leading tokens that start before character ``x``."""
        return int(self.starts.searchsorted(x, side="left"))


class EncodingOffsets:
    """The same searches, read lazily from a ``tokenizers.Encoding``: no per-token Python objects.

    Converting ``encoding.offsets`` (a list of tuples) to an array costs about as much per token as
    ~20% of the tokenisation itself; a sample needs only a few binary searches (~8 probes each).
    The loops below are numpy's ``searchsorted`` bisection step for step (same midpoints, same
    comparisons), so the answers are identical even where offsets are not sorted.
    """

    def __init__(self, encoding: Any, n: int):
        self._chars = encoding.token_to_chars  # token j -> (start, end), the same pairs as .offsets
        self._n = n

    def __len__(self) -> int:
        return self._n

    def start(self, j: int) -> int:
        return self._chars(j)[0]

    def end(self, j: int) -> int:
        return self._chars(j)[1]

    def ends_right(self, x: int) -> int:
        lo, hi, chars = 0, self._n, self._chars
        while lo < hi:
            mid = (lo + hi) >> 1
            if chars(mid)[1] <= x:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def starts_left(self, x: int) -> int:
        lo, hi, chars = 0, self._n, self._chars
        while lo < hi:
            mid = (lo + hi) >> 1
            if chars(mid)[0] < x:
                lo = mid + 1
            else:
                hi = mid
        return lo


TokenOffsets = Union[ArrayOffsets, EncodingOffsets]


def learn_ranges(
    offsets: TokenOffsets,
    spans: Sequence[tuple[int, int]],
    eot_ok: Callable[[int], bool] | None = None,
) -> list[tuple[int, int]]:
    """Token ranges ``[first, stop)`` to learn, one per character span, in order, never overlapping.

    A token is learned when it overlaps a span; ``eot_ok(j)`` says token ``j`` may serve as the
    end-of-turn marker that directly follows a span (then it is learned as well).

    >>> offs = ArrayOffsets(np.array([[0, 3], [3, 5], [5, 9], [9, 19]]))
    >>> learn_ranges(offs, [(3, 9)], eot_ok=lambda j: j == 3)
    [(1, 4)]
    """
    ranges = []
    n, cursor = len(offsets), 0
    for start, end in spans:
        first = max(offsets.ends_right(start), cursor)
        stop = max(offsets.starts_left(end), first)
        if eot_ok is not None and stop < n and eot_ok(stop) and offsets.start(stop) == end:
            stop += 1
        ranges.append((first, stop))
        cursor = stop
    return ranges


def mask_from_ranges(n: int, ranges: Sequence[tuple[int, int]], out: np.ndarray | None = None) -> np.ndarray:
    """``n`` = 5, ranges ``[(1, 3)]`` -> ``[0, 1, 1, 0, 0]`` (uint8).

    ``out``: a zeroed uint8 array of length ``n`` to fill instead of a new one (e.g. a slice of a
    chunk's mask, so a worker writes every sample's mask into one buffer).
    """
    mask = np.zeros(n, dtype=np.uint8) if out is None else out
    for first, stop in ranges:
        mask[first:stop] = 1
    return mask


def subtract_ranges(
    ranges: Sequence[tuple[int, int]], holes: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Token ranges minus holes, both sorted and non-overlapping; empty pieces are dropped.

    >>> subtract_ranges([(0, 10)], [(2, 4), (6, 7)])
    [(0, 2), (4, 6), (7, 10)]
    """
    out = []
    for first, stop in ranges:
        for h_first, h_stop in holes:
            if h_stop <= first or h_first >= stop:
                continue
            if h_first > first:
                out.append((first, h_first))
            first = max(first, h_stop)
        if stop > first:
            out.append((first, stop))
    return out


def build_ids_and_mask(
    ids: np.ndarray,
    offsets: np.ndarray,
    spans: Sequence[tuple[int, int]],
    eot_ok: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` from an ``(n, 2)`` array of character ``[start, end)`` offsets per token.

    ``spans`` are the character ranges to learn, in order. ``eot_ok[j]`` says token ``j`` may serve
    as an end-of-turn marker.

    >>> ids = np.array([7, 8, 9, 2]); offs = np.array([[0, 3], [3, 5], [5, 9], [9, 19]])
    >>> build_ids_and_mask(ids, offs, [(3, 9)], eot_ok=np.array([0, 0, 0, 1], bool))[1]
    array([0, 1, 1, 1], dtype=uint8)
    """
    ok = None if eot_ok is None else (lambda j: bool(eot_ok[j]))
    ranges = learn_ranges(ArrayOffsets(offsets), spans, ok)
    return np.asarray(ids).astype(np.int32), mask_from_ranges(len(ids), ranges)
