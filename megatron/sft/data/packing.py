"""Pure numpy helpers to pack whole SFT samples into fixed-length training sequences.

Why pack: SFT samples are mostly a few hundred tokens; padding each to ``seq_length`` 4096 would
waste most of the compute. Packing concatenates whole samples (never split) and keeps them apart
with per-sample ``cu_seqlens`` (attention isolation) and ``position_ids`` that restart at 0.

The label shift happens in exactly one place, ``shift_sample``: a sample of ``L`` tokens gives
``L - 1`` (input, label) positions, so it occupies ``L - 1`` slots of a pack. Worked example,
samples ``a = [a0 a1 a2 a3]`` (mask ``[0 0 1 1]``) and ``b = [b0 b1 b2]`` (mask ``[0 1 1]``),
``seq_length = 7``, pad id ``P``::

    tokens        a0 a1 a2 b0 b1  P  P
    labels        a1 a2 a3 b1 b2  P  P
    loss_mask      0  1  1  1  1  0  0      (mask of the *label* token; padding 0)
    position_ids   0  1  2  0  1  0  1      (restart per sample; padding is its own segment)
    cu_seqlens    [0, 3, 5, 7]
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np


def shift_sample(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, mask)`` of one sample -> ``(tokens, labels, loss_mask)``, each one shorter.

    >>> shift_sample(np.array([5, 6, 7]), np.array([0, 1, 1]))
    (array([5, 6]), array([6, 7]), array([1, 1]))
    """
    return ids[:-1], ids[1:], mask[1:]


def position_ids_for(lengths) -> np.ndarray:
    """Lengths ``[3, 2]`` -> ``[0, 1, 2, 0, 1]``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) - starts


def cu_seqlens_for(lengths) -> np.ndarray:
    """Lengths ``[3, 2]`` -> ``[0, 3, 5]`` (int32, as flash-attention's varlen kernels expect)."""
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def pack_best_fit(
    sizes: np.ndarray, capacity: int, window: int = 2048, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Group item indices into bins of total size <= ``capacity`` (best-fit decreasing).

    Items are visited in a shuffled order (``rng``; identity if None) and packed one window of
    ``window`` items at a time: the window is sorted longest first and each item goes to the open
    bin it fills most tightly, or to a new bin. Bins are closed at the end of each window, so memory
    and randomness stay local; the packs are returned in shuffled order.

    >>> pack_best_fit(np.array([5, 3, 4, 2]), capacity=7)
    [array([0, 3]), array([2, 1])]
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size and int(sizes.max()) > capacity:
        worst = int(np.argmax(sizes))
        raise ValueError(
            f"item {worst} has size {int(sizes[worst])} > capacity {capacity}; filter samples "
            "longer than the sequence length before packing."
        )
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}.")
    order = rng.permutation(sizes.size) if rng is not None else np.arange(sizes.size)
    packs: list[np.ndarray] = []
    for begin in range(0, sizes.size, window):
        chunk = order[begin:begin + window]
        chunk = chunk[np.argsort(-sizes[chunk], kind="stable")]
        bins: list[list[int]] = []
        free: list[tuple[int, int]] = []  # (remaining capacity, bin id), kept sorted
        for item in chunk.tolist():
            size = int(sizes[item])
            at = bisect_left(free, (size, -1))
            if at < len(free):
                remaining, bin_id = free.pop(at)
            else:
                remaining, bin_id = capacity, len(bins)
                bins.append([])
            bins[bin_id].append(item)
            insort(free, (remaining - size, bin_id))
        packs.extend(np.asarray(b, dtype=np.int64) for b in bins)
    if rng is not None:
        packs = [packs[i] for i in rng.permutation(len(packs))]
    return packs


def packing_efficiency(pack_sizes, capacity: int) -> float:
    """Fraction of non-padding slots: sizes ``[7, 5]`` at capacity 8 -> 12 / 16 = 0.75."""
    pack_sizes = np.asarray(pack_sizes, dtype=np.int64)
    return float(pack_sizes.sum() / (capacity * max(len(pack_sizes), 1)))


def assemble_pack(
    samples: list[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Whole ``(ids, mask)`` samples -> one training row (see the module docstring example).

    Returns ``tokens, labels, position_ids`` (int64, length ``seq_length``), ``loss_mask``
    (float32) and ``cu_seqlens`` (int32, sample boundaries, plus ``seq_length`` if padded).
    """
    tokens, labels, loss_mask, lengths = [], [], [], []
    for ids, mask in samples:
        t, l, m = shift_sample(np.asarray(ids, np.int64), np.asarray(mask))
        tokens.append(t)
        labels.append(l)
        loss_mask.append(m.astype(np.float32))
        lengths.append(len(t))
    used = sum(lengths)
    if used > seq_length:
        raise ValueError(f"samples need {used} positions but seq_length is {seq_length}.")
    pad = seq_length - used
    segment_lengths = lengths + ([pad] if pad else [])
    return {
        "tokens": np.concatenate(tokens + [np.full(pad, pad_id, np.int64)]),
        "labels": np.concatenate(labels + [np.full(pad, pad_id, np.int64)]),
        "loss_mask": np.concatenate(loss_mask + [np.zeros(pad, np.float32)]),
        "position_ids": position_ids_for(segment_lengths),
        "cu_seqlens": cu_seqlens_for(segment_lengths),
    }
