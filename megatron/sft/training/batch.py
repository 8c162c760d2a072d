"""Batch tensors for one micro-batch (pure torch, no process group).

The dataset already did the one shift by one (``labels[t] = tokens[t + 1]``) and aligned
``loss_mask`` to ``labels``; this module only builds what attention needs from ``cu_seqlens``
and reduces per-token losses.
"""

from __future__ import annotations

import torch


def valid_cu_seqlens(cu_row: torch.Tensor) -> torch.Tensor:
    """``collate_sft`` right-pads rows with -1: ``[0, 3, 7, -1] -> [0, 3, 7]``."""
    return cu_row[cu_row >= 0]


def segment_ids(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """``[b, s]`` id of the packed sample each position belongs to; positions after the last
    boundary (padding) form one more segment of their own.

    >>> segment_ids(torch.tensor([[0, 3, 5, -1]]), 6).tolist()
    [[0, 0, 0, 1, 1, 2]]
    """
    rows = []
    positions = torch.arange(seq_length, device=cu_seqlens.device)
    for cu in cu_seqlens:
        bounds = valid_cu_seqlens(cu)[1:].to(positions.dtype)
        rows.append(torch.bucketize(positions, bounds, right=True))
    return torch.stack(rows)


def packed_attention_mask(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Block-diagonal causal mask ``[b, 1, s, s]``, ``True`` = masked out (megatron-core's
    convention): a token attends to earlier tokens of its own sample only.

    With ``cu_seqlens=[[0, 2, 3]]`` and ``s=3``, allowed (``False``) entries are
    ``(0,0) (1,0) (1,1) (2,2)``.
    """
    seg = segment_ids(cu_seqlens, seq_length)
    same = seg.unsqueeze(-1) == seg.unsqueeze(-2)
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool,
                        device=cu_seqlens.device).tril()
    return ~(same & causal).unsqueeze(1)


def masked_loss_sum(per_token_loss: torch.Tensor, loss_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of masked losses, number of loss tokens)`` for one micro-batch; the division by
    the token count of the whole global batch happens once, after all micro-batches and
    data-parallel ranks are summed (megatron-core's per-token loss mode)."""
    mask = loss_mask.to(per_token_loss.dtype)
    return (per_token_loss.float() * mask.float()).sum(), mask.sum().to(torch.int64)


def thd_cu_seqlens(cu_seqlens: torch.Tensor, seq_length: int) -> tuple[torch.Tensor, int]:
    """Flatten a micro-batch of packed rows into one THD sequence for Transformer Engine.

    Every row becomes ``seq_length`` consecutive tokens; its boundaries are shifted by the row's
    offset, and trailing padding becomes a segment of its own so it attends only to itself.
    Returns ``(cu_seqlens int32 [n+1], max_seqlen)``.

    >>> thd_cu_seqlens(torch.tensor([[0, 3, 5], [0, 6, -1]]), 6)
    (tensor([ 0,  3,  5,  6, 12], dtype=torch.int32), 6)
    """
    bounds: list[int] = [0]
    for row, cu in enumerate(cu_seqlens.tolist()):
        offset = row * seq_length
        ends = [c for c in cu if c > 0]
        if not ends or ends[-1] != seq_length:
            ends.append(seq_length)
        bounds.extend(offset + e for e in ends)
    out = torch.tensor(bounds, dtype=torch.int32, device=cu_seqlens.device)
    return out, int((out[1:] - out[:-1]).max())
