"""Cross-entropy over tensor-parallel vocabulary shards, with Megatron's vocabulary padding
excluded so the loss equals transformers' on the real vocabulary."""

from __future__ import annotations

import torch


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Padded vocabulary rows (zeros from conversion, never targets) would still enter the
    softmax denominator; push their logits to the dtype's minimum on the rank that holds them.

    ``logits`` is this TP rank's ``[..., padded_vocab / TP]`` slice.
    """
    from megatron.sft.runtime.parallel_dims import parallel_dims

    per_rank = logits.shape[-1]
    start = parallel_dims().tp_rank * per_rank
    pad_from = vocab_size - start
    if pad_from >= per_rank:
        return logits
    logits = logits.clone()
    logits[..., max(pad_from, 0):] = torch.finfo(logits.dtype).min
    return logits


def vocab_parallel_token_loss(logits: torch.Tensor, labels: torch.Tensor,
                              vocab_size: int) -> torch.Tensor:
    """Per-token loss ``[b, s]`` from TP-sharded logits ``[b, s, V/TP]``."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = mask_padded_vocab(logits.float(), vocab_size)
    # megatron-core expects [s, b, V/TP] and [s, b].
    return vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(),
                                        labels.transpose(0, 1).contiguous()).transpose(0, 1)
