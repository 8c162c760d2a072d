"""Forward-only logits through megatron-core's real pipeline schedule (eval, parity checks)."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.sft.runtime.parallel_dims import parallel_dims


@torch.no_grad()
def pipeline_logits(chunks: list, tokens: torch.Tensor, vocab_size: int,
                    num_microbatches: int = 1) -> Optional[torch.Tensor]:
    """Full-vocabulary logits ``[batch, seq, vocab_size]`` on last-stage ranks, ``None`` elsewhere.

    ``tokens`` is ``[batch, seq]`` and identical on every rank; it is split into
    ``num_microbatches`` equal micro-batches (interleaved schedules need a multiple of PP).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq = tokens.shape
    if batch % num_microbatches:
        raise ValueError(f"batch {batch} is not divisible by {num_microbatches} micro-batches")
    mbs = batch // num_microbatches
    device = next(chunks[0].parameters()).device
    tokens = tokens.to(device)
    micro = [tokens[i * mbs:(i + 1) * mbs] for i in range(num_microbatches)]
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(mbs, seq)
    collected: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        batch_tokens = next(data_iterator)
        output = model(batch_tokens, position_ids, attention_mask=None)

        def collect(output_tensor):
            collected.append(gather_from_tensor_model_parallel_region(output_tensor)[..., :vocab_size])
            return output_tensor.new_zeros(()), {}

        return output, collect

    for model in chunks:
        model.eval()
    iters = [iter(micro) for _ in chunks]
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=True,
    )
    if not parallel_dims().is_last_stage:
        return None
    return torch.cat(collected, dim=0).float()
