"""Batch tensors for one micro-batch (pure torch, no process group).

The dataset already did the one shift by one (``labels[t] = tokens[t + 1]``) and aligned
``loss_mask`` to ``labels``; this module reduces per-token losses (each rank's rows are
``runtime.layout.microbatch_rows``). What attention needs from ``cu_seqlens`` is built by the layer implementation
(``megatron.sft.runtime.layer_impl``).
"""

from __future__ import annotations

import torch

from megatron.sft.runtime.layout import microbatch_rows  # noqa: F401  (how a batch is cut)


def valid_cu_seqlens(cu_row: torch.Tensor) -> torch.Tensor:
    """``collate_sft`` right-pads rows with -1: ``[0, 3, 7, -1] -> [0, 3, 7]``."""
    return cu_row[cu_row >= 0]


def masked_loss_sum(per_token_loss: torch.Tensor, loss_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of masked losses, number of loss tokens)`` for one micro-batch; the division by
    the token count of the whole global batch happens once, after all micro-batches and
    data-parallel ranks are summed (megatron-core's per-token loss mode)."""
    mask = loss_mask.to(per_token_loss.dtype)
    return (per_token_loss.float() * mask.float()).sum(), mask.sum().to(torch.int64)
