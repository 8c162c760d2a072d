"""Batch tensors for one micro-batch (pure torch, no process group).

The dataset already did the one shift by one (``labels[t] = tokens[t + 1]``) and aligned
``loss_mask`` to ``labels``; this module reduces per-token losses (each rank's rows are
``runtime.layout.microbatch_rows``). What attention needs from ``cu_seqlens`` is built by the layer implementation
(``megatron.sft.model.layer_impl``).
"""

from __future__ import annotations

import torch

from typing import Any, Optional

from megatron.sft.model.context_parallel.split import take_tokens
from megatron.sft.runtime.layout import microbatch_rows  # noqa: F401  (how a batch is cut)

#: the per-token tensors of a micro-batch that context parallelism cuts (and their padding value)
#: (``padding_mask``: MoE routing's, True = padding, only in MoE batches)
PER_TOKEN = {"tokens": 0, "labels": 0, "loss_mask": 0.0, "position_ids": 0,
             "padding_mask": True}


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


def local_micro_batch(batch: dict[str, Any], index: Optional[torch.Tensor]) -> dict[str, Any]:
    """This context-parallel rank's part of a collated micro-batch: ``tokens``, ``labels``,
    ``loss_mask``, ``position_ids`` (and a MoE batch's ``padding_mask``) taken at ``index`` (``AttentionInputs.local_index``;
    ``-1`` = padding: token 0, no loss); ``None`` keeps the batch whole. The labels were shifted
    before the cut, so every kept token keeps its own next-token target.

    >>> b = {"tokens": torch.arange(8).view(1, 8), "labels": torch.arange(1, 9).view(1, 8),
    ...      "loss_mask": torch.ones(1, 8), "position_ids": torch.arange(8).view(1, 8)}
    >>> local_micro_batch(b, torch.tensor([[0, 1, 6, 7]]))["labels"].tolist()
    [[1, 2, 7, 8]]
    """
    if index is None:
        return batch
    out = dict(batch)
    for key, fill in PER_TOKEN.items():
        if key in batch:
            out[key] = take_tokens(batch[key], index, fill)
    return out
