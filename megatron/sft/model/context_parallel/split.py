"""How a packed micro-batch is cut for context parallelism (CP), and which keys each of a
rank's queries may see (pure: no process group, no megatron-core).

**The split.** Each row of ``s`` tokens is cut into ``2·CP`` chunks of ``c = s / (2·CP)``; CP rank
``r`` holds chunks ``r`` and ``2·CP−1−r``, in that order. Causal attention costs more late in a
row, so pairing an early chunk with a late one balances the work. megatron-core's RoPE cuts its
position table the same way for CP ranks (``rope_utils.get_pos_emb_on_this_cp_rank``: view the
``s`` positions as ``[2·CP, c]``, index-select ``[r, 2·CP−1−r]``), so the tokens this module
gives a rank are exactly the positions megatron-core rotates them by. Example, ``s = 8``, CP 2
(chunks of 2)::

    rank 0: chunks 0, 3 -> positions [0, 1, 6, 7]
    rank 1: chunks 1, 2 -> positions [2, 3, 4, 5]

**Attention.** Every rank all-gathers K and V over the CP group (small with GQA) and runs its own
queries against them, causally within each document (the design Llama 3 trained with document
masks). A document may cross chunk boundaries and ranks; a rank may hold pieces of several
documents, or none of one. :func:`query_pieces` lists, for this rank's flattened queries, each
maximal run inside one document and one chunk (a *piece*) with the keys it sees: from the
document's start (or the sliding window's) to the piece's last query, so the causal mask of a
piece is aligned to its bottom-right corner. Every backend runs from the same pieces: ``sdpa``
one call per piece, ``varlen`` with ``cu_seqlens_q`` / ``cu_seqlens_k`` made from them
(:func:`varlen_layout`), ``flex`` with a BlockMask whose queries are offset to their global
positions (:func:`local_token_index`).

Tokens are numbered as at CP1: row-major over the micro-batch's ``b`` rows, ``b * s`` in all,
with document boundaries ``bounds`` from ``attention.segments_from_cu_seqlens`` (trailing
padding is a document of its own). A rank's *local* tokens are row-major over ``b`` rows of
``s / CP``.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Optional, Sequence

import torch


class ContextParallelError(ValueError):
    """A row length or batch that cannot be cut for the requested context parallelism."""


def row_multiple(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """What every row length must be a multiple of: ``2·CP`` chunks, each rank's ``s / CP``
    tokens split again over TP ranks with sequence parallelism.

    >>> row_multiple(2), row_multiple(2, 2, sequence_parallel=True), row_multiple(1, 4, True)
    (4, 8, 4)
    """
    return (2 * cp if cp > 1 else 1) * (tp if sequence_parallel else 1)


def chunk_ids(cp: int, rank: int) -> tuple[int, int]:
    """The two chunks rank ``rank`` holds: ``(r, 2·CP−1−r)``."""
    return rank, 2 * cp - 1 - rank


def row_positions(seq_length: int, cp: int, rank: int) -> torch.Tensor:
    """Positions within a row of this rank's ``s / CP`` tokens, in local order.

    >>> row_positions(8, 2, 0).tolist(), row_positions(8, 2, 1).tolist()
    ([0, 1, 6, 7], [2, 3, 4, 5])
    """
    if cp == 1:
        return torch.arange(seq_length)
    c = chunk_length(seq_length, cp)
    return torch.cat([torch.arange(j * c, (j + 1) * c) for j in chunk_ids(cp, rank)])


def chunk_length(seq_length: int, cp: int) -> int:
    if seq_length % (2 * cp):
        raise ContextParallelError(
            f"a row of {seq_length} tokens cannot be cut into 2 x CP = {2 * cp} equal chunks; "
            f"use a --seq-length divisible by {2 * cp}")
    return seq_length // (2 * cp)


def local_token_index(rows: int, seq_length: int, cp: int, rank: int) -> torch.Tensor:
    """``[rows, s / CP]`` indices of this rank's tokens into the micro-batch flattened to
    ``rows * s`` (``tokens.reshape(-1)[index]`` is the rank's ``[rows, s / CP]`` slice).

    >>> local_token_index(2, 8, 2, 1).tolist()
    [[2, 3, 4, 5], [10, 11, 12, 13]]
    """
    return torch.arange(rows).unsqueeze(1) * seq_length + row_positions(seq_length, cp, rank)


def gather_order(seq_length: int, cp: int) -> torch.Tensor:
    """``[s]``: where row position ``p`` sits in the CP all-gather of every rank's local
    tokens (rank-major: rank 0's ``s / CP``, then rank 1's, ...), so
    ``gathered.index_select(0, gather_order(s, cp))`` is the row in order again.

    >>> gather_order(8, 2).tolist()  # gathered = positions [0, 1, 6, 7, 2, 3, 4, 5]
    [0, 1, 4, 5, 6, 7, 2, 3]
    """
    gathered = torch.cat([row_positions(seq_length, cp, r) for r in range(cp)])
    order = torch.empty_like(gathered)
    order[gathered] = torch.arange(seq_length)
    return order


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of this rank's queries inside one document and one chunk, and the keys it sees.

    ``q_start:q_end`` index the rank's local flattened queries; ``k_start:k_end`` index the
    micro-batch's flattened tokens (the all-gathered keys, in CP1 order). The last query sees
    up to the last key: ``k_end`` is the global position after the piece's last query, and the
    causal mask is aligned to the bottom-right corner (query ``q_end - 1 - i`` sees keys up to
    ``k_end - 1 - i``).
    """

    q_start: int
    q_end: int
    k_start: int
    k_end: int

    @property
    def queries(self) -> int:
        return self.q_end - self.q_start

    @property
    def keys(self) -> int:
        return self.k_end - self.k_start


def query_pieces(bounds: Sequence[int], rows: int, seq_length: int, cp: int, rank: int,
                 window: Optional[int] = None) -> tuple[Piece, ...]:
    """This rank's pieces, in local order; they tile its ``rows * s / CP`` queries.

    ``window`` (a sliding window of ``W`` tokens: query ``i`` sees keys ``i - W < j <= i``)
    moves each piece's first key to ``max(document start, first query - W + 1)``.

    One row of 8 tokens, documents ``[0, 5)`` and ``[5, 8)``, CP 2, rank 0 (positions
    ``[0, 1, 6, 7]``): chunk 0 is the start of document 0; chunk 3 is the end of document 1,
    whose queries 6 and 7 see keys from 5:

    >>> query_pieces((0, 5, 8), 1, 8, 2, 0)
    (Piece(q_start=0, q_end=2, k_start=0, k_end=2), Piece(q_start=2, q_end=4, k_start=5, k_end=8))
    """
    c = chunk_length(seq_length, cp) if cp > 1 else seq_length
    chunks = chunk_ids(cp, rank) if cp > 1 else (0,)
    pieces = []
    local = 0
    for row in range(rows):
        for j in chunks:
            g0 = row * seq_length + j * c
            g1 = g0 + c
            d = bisect.bisect_right(bounds, g0) - 1  # the document holding the chunk's start
            while bounds[d] < g1:
                qa, qb = max(g0, bounds[d]), min(g1, bounds[d + 1])
                ka = bounds[d] if window is None else max(bounds[d], qa - window + 1)
                pieces.append(Piece(local + qa - g0, local + qb - g0, ka, qb))
                d += 1
            local += c
    return tuple(pieces)


@dataclasses.dataclass(frozen=True)
class VarlenLayout:
    """What ``varlen_attn`` takes for this rank's pieces: one "sequence" per piece, its queries
    the piece's (contiguous in the local tokens) and its keys copied out of the gathered K/V
    with ``key_index`` (pieces of one document on one rank see overlapping key ranges)."""

    cu_seqlens_q: tuple[int, ...]
    cu_seqlens_k: tuple[int, ...]
    key_index: torch.Tensor
    max_q: int
    max_k: int


def varlen_layout(pieces: Sequence[Piece]) -> VarlenLayout:
    """The pieces as varlen sequences (rank 0 of the :func:`query_pieces` example).

    >>> v = varlen_layout(query_pieces((0, 5, 8), 1, 8, 2, 0))
    >>> v.cu_seqlens_q, v.cu_seqlens_k, v.key_index.tolist()
    ((0, 2, 4), (0, 2, 5), [0, 1, 5, 6, 7])
    """
    cu_q, cu_k = [0], [0]
    for p in pieces:
        cu_q.append(cu_q[-1] + p.queries)
        cu_k.append(cu_k[-1] + p.keys)
    index = torch.cat([torch.arange(p.k_start, p.k_end) for p in pieces]) if pieces else \
        torch.zeros(0, dtype=torch.long)
    return VarlenLayout(tuple(cu_q), tuple(cu_k), index,
                        max((p.queries for p in pieces), default=0),
                        max((p.keys for p in pieces), default=0))


def document_ids(bounds: Sequence[int]) -> torch.Tensor:
    """``[t]`` document number of every flattened token.

    >>> document_ids((0, 2, 3, 5)).tolist()
    [0, 0, 1, 2, 2]
    """
    lengths = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])])
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


# ---------------------------------------------------------------------------- Transformer Engine
@dataclasses.dataclass(frozen=True)
class ThdLayout:
    """A micro-batch re-laid out for Transformer Engine's THD context parallelism (the ``te``
    backend): every document padded to a multiple of ``2·CP`` and cut into ``2·CP`` chunks of
    its own, rank ``r`` taking chunks ``r`` and ``2·CP−1−r`` of each (what TE's
    ``thd_get_partitioned_indices`` selects, and the layout its CP attention expects).

    ``index`` ``[1, n_local]``: this rank's tokens as indices into the flattened micro-batch,
    ``-1`` for padding (token 0, no loss). ``cu_seqlens`` are the documents' real lengths and
    ``cu_seqlens_padded`` their padded ones, both over the whole (padded) sequence, as
    megatron-core's ``PackedSeqParams`` takes them.
    """

    index: torch.Tensor
    cu_seqlens: tuple[int, ...]
    cu_seqlens_padded: tuple[int, ...]
    max_seqlen: int


def thd_layout(bounds: Sequence[int], cp: int, rank: int) -> ThdLayout:
    """This rank's part of the micro-batch in TE's THD CP layout.

    >>> t = thd_layout((0, 3, 8), 2, 0)  # documents 3 -> padded 4, 5 -> padded 8
    >>> t.cu_seqlens, t.cu_seqlens_padded, t.index.tolist()
    ((0, 3, 8), (0, 4, 12), [[0, -1, 3, 4, -1, -1]])
    """
    m = 2 * cp
    cu, cu_pad, picked = [0], [0], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        n = b - a
        padded = -(-n // m) * m
        doc = torch.full((padded,), -1, dtype=torch.long)
        doc[:n] = torch.arange(a, b)
        c = padded // m
        picked += [doc[j * c:(j + 1) * c] for j in chunk_ids(cp, rank)]
        cu.append(cu[-1] + n)
        cu_pad.append(cu_pad[-1] + padded)
    index = torch.cat(picked).unsqueeze(0)
    longest = max(b - a for a, b in zip(cu_pad[:-1], cu_pad[1:]))
    return ThdLayout(index, tuple(cu), tuple(cu_pad), longest)


def take_tokens(tensor: torch.Tensor, index: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """``tensor`` ``[b, s]`` -> this rank's ``index``-shaped slice of its flattened values;
    ``-1`` entries become ``fill`` (padding tokens: token 0, label 0, loss mask 0).

    >>> take_tokens(torch.arange(10, 18).view(1, 8), torch.tensor([[0, -1, 7]])).tolist()
    [[10, 0, 17]]
    """
    flat = tensor.reshape(-1)
    out = flat[index.clamp(min=0).to(flat.device)]
    if (index < 0).any():
        out = out.masked_fill((index < 0).to(out.device), fill)
    return out
