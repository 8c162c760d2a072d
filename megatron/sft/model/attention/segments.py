"""Which tokens of a packed micro-batch attend to which: document boundaries and the
``DocumentSegments`` every layer reads (pure, plus megatron-core's ``PackedSeqParams`` base).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Optional

import torch

from megatron.sft.model.context_parallel import split as cp_split

if TYPE_CHECKING:
    DocumentSegments = Any  # the class is made on first use (_document_segments_class)


# --------------------------------------------------------------------------------- segments
@functools.lru_cache(maxsize=None)
def _document_segments_class() -> type:
    # Made on first use: its base, megatron-core's PackedSeqParams, imports all of megatron.core
    # (seconds), which the CLI's --help must not pay for reading the backend registry.
    from megatron.core.packed_seq_params import PackedSeqParams

    @dataclasses.dataclass
    class DocumentSegments(PackedSeqParams):
        """megatron-core's ``PackedSeqParams`` plus what our backends need, computed once per
        micro-batch on the host so no layer synchronises with the GPU to read boundaries.

        ``bounds`` are offsets into the micro-batch flattened row-major to ``b * s`` tokens;
        every row's trailing padding is a document of its own (it attends only to itself).
        """

        bounds: tuple[int, ...] = ()
        rows: int = 1
        row_length: int = 0
        #: created lazily by the flex backend and reused by every layer of the micro-batch
        block_mask: object = None
        #: context parallelism: this rank's query pieces (``cp_split.query_pieces``) and the
        #: ``[rows, s / CP]`` global index of its tokens; empty / ``None`` at CP1
        cp_size: int = 1
        cp_pieces: tuple = ()
        cp_query_index: Optional[torch.Tensor] = None
        #: created lazily by the varlen backend at CP > 1 (``cp_kernels.cp_varlen_inputs``)
        cp_varlen: object = None

        @property
        def max_document_length(self) -> int:
            return max(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:]))

    DocumentSegments.__qualname__ = "DocumentSegments"  # pickles as attention.DocumentSegments
    return DocumentSegments


def __getattr__(name: str) -> Any:
    """``from megatron.sft.model.attention import DocumentSegments`` builds the class."""
    if name == "DocumentSegments":
        return _document_segments_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def segments_from_cu_seqlens(cu_seqlens: Optional[torch.Tensor], rows: int,
                             seq_length: int) -> tuple[int, ...]:
    """Flattened document boundaries of a micro-batch (pure).

    ``cu_seqlens`` is ``collate_sft``'s ``[b, n]`` (right-padded with -1), or ``None`` for
    unpacked rows (one document per row).

    >>> segments_from_cu_seqlens(torch.tensor([[0, 3, 5, -1], [0, 6, -1, -1]]), 2, 6)
    (0, 3, 5, 6, 12)
    >>> segments_from_cu_seqlens(None, 2, 4)
    (0, 4, 8)
    """
    if cu_seqlens is None:
        return tuple(range(0, rows * seq_length + 1, seq_length))
    bounds = [0]
    for row, cu in enumerate(cu_seqlens.tolist()):
        ends = [c for c in cu if c > 0]
        if not ends or ends[-1] != seq_length:
            ends.append(seq_length)
        bounds.extend(row * seq_length + e for e in ends)
    return tuple(bounds)


def document_segments(cu_seqlens: Optional[torch.Tensor], rows: int, seq_length: int,
                      device: torch.device, *, cp_size: int = 1, cp_rank: int = 0,
                      window: Optional[int] = None) -> DocumentSegments:
    """``seq_length`` is the whole row's length, at any CP size."""
    bounds = segments_from_cu_seqlens(cu_seqlens, rows, seq_length)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    cp = {}
    if cp_size > 1:
        cp = dict(cp_size=cp_size,
                  cp_pieces=cp_split.query_pieces(bounds, rows, seq_length, cp_size, cp_rank,
                                                  window),
                  cp_query_index=cp_split.local_token_index(rows, seq_length, cp_size,
                                                            cp_rank).to(device))
    # max_seqlen_* = the row length: megatron-core sizes its RoPE table from it (and, at CP > 1,
    # gives each rank the positions of its chunks, the ones cp_split gives it).
    return _document_segments_class()(
        qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=seq_length,
        max_seqlen_kv=seq_length, bounds=bounds, rows=rows, row_length=seq_length, **cp)


def segment_ids(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """``[b, s]`` id of the packed sample each position belongs to; positions after the last
    boundary (padding) form one more segment of their own.

    >>> segment_ids(torch.tensor([[0, 3, 5, -1]]), 6).tolist()
    [[0, 0, 0, 1, 1, 2]]
    """
    rows = []
    positions = torch.arange(seq_length, device=cu_seqlens.device)
    for cu in cu_seqlens:
        bounds = cu[cu >= 0][1:].to(positions.dtype)
        rows.append(torch.bucketize(positions, bounds, right=True))
    return torch.stack(rows)


def packed_attention_mask(cu_seqlens: torch.Tensor, seq_length: int,
                          window: Optional[int] = None) -> torch.Tensor:
    """Block-diagonal causal mask ``[b, 1, s, s]``, ``True`` = masked out (megatron-core's
    convention): a token attends to earlier tokens of its own sample only (and, with a sliding
    ``window``, only to the last ``window`` of them, itself included).

    With ``cu_seqlens=[[0, 2, 3]]`` and ``s=3``, allowed (``False``) entries are
    ``(0,0) (1,0) (1,1) (2,2)``. This is the ``dense`` attention backend: O(s^2) memory, kept as
    the reference the other backends are tested against.
    """
    seg = segment_ids(cu_seqlens, seq_length)
    same = seg.unsqueeze(-1) == seg.unsqueeze(-2)
    return ~(same & banded_causal_mask(seq_length, window, cu_seqlens.device)).unsqueeze(1)


def banded_causal_mask(length: int, window: Optional[int], device=None) -> torch.Tensor:
    """``[l, l]`` bool, ``True`` = may attend: causal, and within ``window`` tokens if given.

    >>> banded_causal_mask(4, 2).int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    i = torch.arange(length, device=device)
    diff = i[:, None] - i[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


