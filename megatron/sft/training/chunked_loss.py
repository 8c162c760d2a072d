"""The output layer and the masked cross-entropy in chunks of tokens, so the ``[tokens, vocab/TP]``
logits and their fp32 softmax never exist whole (``--chunked-loss``).

At 16k tokens a 152k vocabulary makes 2.5G logits per micro-batch and TP rank: 5 GB in bf16,
10 GB more for the fp32 softmax, more than the rest of a 1.5B model's activations.
:class:`ChunkedVocabParallelCrossEntropy` takes the final hidden states ``[n, h]`` and this TP
rank's output weight ``[v/TP, h]`` and, ``chunk`` tokens at a time, computes the logits, the
vocab-parallel log-softmax (max and sum of exponentials all-reduced over TP, as megatron-core's
``vocab_parallel_cross_entropy``), the masked loss, and right away the gradients (Liger's fused
linear cross-entropy does the same): ``dlogits = (softmax − onehot) · mask``,
``dH = dlogits · W``, ``dW += dlogitsᵀ · H``. Backward only scales the stored ``dH``, ``dW`` by the
incoming gradient, so nothing is recomputed and the peak is one chunk's logits (plus the
weight-sized ``dW`` and the hidden-sized ``dH`` a step holds anyway).

The numbers are today's (:func:`megatron.sft.training.loss.vocab_parallel_token_loss`): logits
in the model's dtype cast to fp32, the padded vocabulary (conversion's zero rows past
``vocab_size``) pushed to the fp32 minimum on the rank that holds it, the same reductions. Before
the chunks, the hidden states go through what megatron-core's ``ColumnParallelLinear`` does to
its input: all-gathered over TP with sequence parallelism (backward reduce-scatter), else
``copy_to_tensor_model_parallel_region`` (backward all-reduce).

The model side: :func:`defer_output_layer` makes the output layer hand its input through
(``GPTModel`` then returns the hidden states ``[b, s, h]`` where it returned logits), and
:func:`output_weight` is the weight the output layer would have used (tied or not).

Example: 16384 tokens, vocabulary 151936, TP 1, chunks of ``2^25 / 151936 = 220`` tokens: the
largest loss tensor is ``220 x 151936`` fp32 (134 MB) instead of ``16384 x 151936`` (10 GB).
"""

from __future__ import annotations

import types
from typing import Any, Optional

import torch
from megatron.sft.runtime.wrapping import unwrap_model

#: logits per chunk (fp32: 128 MiB); the chunk's token count is this over the shard's vocabulary
LOGITS_PER_CHUNK = 2 ** 25
#: ``--chunked-loss auto`` turns it on above this many logits per micro-batch and TP rank
AUTO_THRESHOLD = 2 ** 26


def use_chunked_loss(setting: str, tokens: int, padded_vocab: int, tp: int) -> bool:
    """``--chunked-loss on|off|auto``; ``auto`` = on when one micro-batch's logits on a TP rank
    exceed :data:`AUTO_THRESHOLD`.

    >>> use_chunked_loss("auto", 16384, 151936, 1), use_chunked_loss("auto", 256, 512, 2)
    (True, False)
    """
    if setting in ("on", "off"):
        return setting == "on"
    return tokens * padded_vocab // tp > AUTO_THRESHOLD


def chunk_tokens(vocab_per_rank: int, logits_per_chunk: int = LOGITS_PER_CHUNK) -> int:
    """Tokens per chunk for a vocabulary shard of ``vocab_per_rank`` rows.

    >>> chunk_tokens(151936), chunk_tokens(32000)
    (220, 1048)
    """
    return max(1, logits_per_chunk // vocab_per_rank)


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and group.size() > 1:
        torch.distributed.all_reduce(x, op=op, group=group)
    return x


class ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """``(hidden [n, h], weight [v/TP, h], labels [n], mask [n]) -> sum of mask · loss`` (fp32
    scalar), ``chunk`` tokens at a time; see the module docstring. ``vocab_start`` is this
    rank's first vocabulary row, ``vocab_size`` the real (unpadded) vocabulary, ``group`` the TP
    group (``None`` at TP1). ``grad=False`` skips the gradient work (evaluation: inside
    ``forward`` grad mode is always off, and ``ctx.needs_input_grad`` does not know it was off
    outside)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, mask, vocab_size: int, vocab_start: int,
                group: Optional[Any], chunk: int, grad: bool = True):
        from torch.distributed import ReduceOp

        n, per_rank = hidden.shape[0], weight.shape[0]
        pad_from = max(min(vocab_size - vocab_start, per_rank), 0)  # padded rows: [pad_from, )
        want_dh, want_dw = (grad and ctx.needs_input_grad[0]), (grad and ctx.needs_input_grad[1])
        dh = torch.empty_like(hidden) if want_dh else None
        acc = torch.promote_types(weight.dtype, torch.float32)  # dW summed over chunks in fp32
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_dw else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for a in range(0, n, chunk):
            h, y, m = hidden[a:a + chunk], labels[a:a + chunk], mask[a:a + chunk].float()
            logits = (h @ weight.t()).float()  # [c, v/TP]
            if pad_from < per_rank:
                logits[:, pad_from:] = torch.finfo(torch.float32).min
            top = _all_reduce(logits.max(dim=-1).values, ReduceOp.MAX, group)
            logits.sub_(top.unsqueeze(-1))
            local = y - vocab_start
            mine = (local >= 0) & (local < per_rank)
            rows = torch.arange(h.shape[0], device=h.device)
            target = torch.where(mine, logits[rows, local.clamp(0, per_rank - 1)],
                                 torch.zeros((), device=h.device))
            exp = logits.exp_()  # in place: the chunk's one [c, v/TP] fp32 buffer
            sums = exp.sum(dim=-1)
            sums, target = _all_reduce(torch.stack([sums, target]), ReduceOp.SUM, group)
            total += ((sums.log() - target) * m).sum()
            if want_dh or want_dw:
                grad = exp.div_(sums.unsqueeze(-1))  # softmax
                grad[rows[mine], local[mine]] -= 1.0
                grad.mul_(m.unsqueeze(-1))
                g = grad.to(weight.dtype)
                if want_dh:
                    dh[a:a + chunk] = g @ weight
                if want_dw:
                    dw += (g.t() @ h).to(acc)
        ctx.save_for_backward(*(t for t in (dh, dw) if t is not None))
        ctx.has = (want_dh, want_dw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        dh = next(saved) * grad_total if ctx.has[0] else None
        dw = (next(saved) * grad_total).to(ctx.weight_dtype) if ctx.has[1] else None
        return dh, dw, None, None, None, None, None, None, None


def chunked_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     loss_mask: torch.Tensor, vocab_size: int, *, sequence_parallel: bool = False,
                     tp_rank: int = 0, tp_group: Optional[Any] = None,
                     chunk: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of masked losses, loss-token count)`` of one micro-batch from ``hidden``
    ``[b, s', h]`` (what ``GPTModel`` returns with :func:`defer_output_layer`; ``s' = s / TP``
    with sequence parallelism), as :func:`megatron.sft.training.batch.masked_loss_sum` of
    today's per-token loss."""
    h = hidden.transpose(0, 1)  # [s', b, h]: megatron-core's layout, sequence first
    if tp_group is not None and tp_group.size() > 1:
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        h = (gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True,
                                                  group=tp_group)
             if sequence_parallel else copy_to_tensor_model_parallel_region(h, group=tp_group))
    s, b = h.shape[0], h.shape[1]
    y, m = labels.transpose(0, 1).reshape(-1), loss_mask.transpose(0, 1).reshape(-1)
    if y.numel() != s * b:
        raise ValueError(f"chunked loss: {s * b} hidden states for {y.numel()} labels")
    per_rank = weight.shape[0]
    total = ChunkedVocabParallelCrossEntropy.apply(
        h.reshape(s * b, h.shape[-1]), weight, y, m, vocab_size, tp_rank * per_rank, tp_group,
        chunk or chunk_tokens(per_rank), torch.is_grad_enabled())
    return total, m.sum().to(torch.int64)


# ----------------------------------------------------------------------------------- model side
def _hand_through(self, input_, weight=None, runtime_gather_output=None):
    return input_, None


def defer_output_layer(chunks: list) -> None:
    """The last stage's output layer returns its input: ``GPTModel`` then returns the final
    hidden states ``[b, s, h]`` (its ``[s, b] -> [b, s]`` transpose as for logits), and the loss
    applies the output weight chunk by chunk. Parameters, names and checkpoints are unchanged."""
    for chunk in chunks:
        layer = getattr(unwrap_model(chunk), "output_layer", None)
        if layer is not None:
            if getattr(layer, "bias", None) is not None:
                raise ValueError("--chunked-loss: the output layer has a bias; use "
                                 "--chunked-loss off")
            layer.forward = types.MethodType(_hand_through, layer)


def output_weight(chunk) -> torch.Tensor:
    """The weight ``GPTModel`` gives its output layer: the embedding's when tied (its copy on
    a last pipeline stage without the embedding), else the output layer's own."""
    model = unwrap_model(chunk)
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight
