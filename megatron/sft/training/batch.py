"""Batch tensors for one micro-batch (pure torch, no process group).

The dataset already did the one shift by one (``labels[t] = tokens[t + 1]``) and aligned
``loss_mask`` to ``labels``; this module picks each micro-batch's rows and reduces per-token
losses. What attention needs from ``cu_seqlens`` is built by the layer implementation
(``megatron.sft.runtime.layer_impl``).
"""

from __future__ import annotations

import torch


def microbatch_rows(iteration: int, global_batch: int, micro_batch: int, dp_rank: int,
                    dp_size: int) -> list[list[int]]:
    """Dataset rows of each micro-batch this DP rank runs at ``iteration`` (pure).

    The global batch ``iteration`` is rows ``[iteration*G, (iteration+1)*G)``; DP rank ``r``
    takes the ``r``-th contiguous ``G/dp`` of them. Example: G=4, m=1, dp=2, iteration 1 ->
    rank 0 ``[[4], [5]]``, rank 1 ``[[6], [7]]``. Resuming at an iteration therefore resumes the
    exact data position.
    """
    per_rank = global_batch // dp_size
    base = iteration * global_batch + dp_rank * per_rank
    return [list(range(base + j * micro_batch, base + (j + 1) * micro_batch))
            for j in range(per_rank // micro_batch)]


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
