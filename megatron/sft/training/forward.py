"""One pass of the pipeline schedule over a list of micro-batches: the micro-batches built from
dataset rows (this CP rank's tokens, the attention backend's inputs), the forward step the
schedule calls, and the per-token loss summed over micro-batches and data-parallel ranks."""

from __future__ import annotations

from typing import Any

import torch

from megatron.sft.data.sft_dataset import collate_sft
from megatron.sft.model.moe import settings as moe
from megatron.sft.training.batch import local_micro_batch, masked_loss_sum
from megatron.sft.training.chunked_loss import chunked_loss_sum, output_weight
from megatron.sft.training.loss import vocab_parallel_token_loss


class ForwardLoss:
    """``forward_loss(dataset, rows)`` on the trainer's wrapped model chunks."""

    def __init__(self, cfg, shape, impl, dims, device, model: list, tconfig,
                 chunked_loss: bool):
        self.cfg, self.shape, self.impl, self.dims, self.device = cfg, shape, impl, dims, device
        self.model, self.tconfig, self.chunked_loss = model, tconfig, chunked_loss

    def microbatches(self, dataset, rows: list[list[int]]) -> list[dict[str, Any]]:
        out = []
        for micro in rows:
            batch = collate_sft([dataset[r % len(dataset)] for r in micro])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            batch.update(moe.routing_padding(batch, self.shape))  # whole rows, cut with them
            attention = self.impl.attention_inputs(
                batch["cu_seqlens"] if self.cfg.packing else None, len(micro),
                self.cfg.seq_length, self.shape.sliding_window, cp_size=self.dims.cp_size,
                cp_rank=self.dims.cp_rank)
            batch = local_micro_batch(batch, attention.local_index)  # this CP rank's tokens
            batch["attention"] = attention
            out.append(batch)
        return out

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        tokens, positions, labels = batch["tokens"], batch["position_ids"], batch["labels"]
        attention = batch["attention"]
        # MoE: the routing padding mask (megatron-core's padding_mask), {} for dense models
        extra = moe.routing_inputs(batch, self.shape, model, attention.flatten_rows,
                                   self.tconfig.sequence_parallel)
        if attention.flatten_rows:  # [b, s] -> [1, b*s]: one THD sequence
            tokens, positions = tokens.reshape(1, -1), positions.reshape(1, -1)
        output = model(tokens, positions, attention_mask=attention.attention_mask,
                       packed_seq_params=attention.packed_seq_params, **extra)
        vocab = self.shape.vocab_size

        def loss_func(output_tensor):
            if attention.flatten_rows:
                output_tensor = output_tensor.reshape(labels.shape + output_tensor.shape[-1:])
            if self.chunked_loss:  # output_tensor is the final hidden states
                loss_sum, count = chunked_loss_sum(
                    output_tensor, output_weight(model), labels, batch["loss_mask"], vocab,
                    sequence_parallel=self.tconfig.sequence_parallel, tp_rank=self.dims.tp_rank,
                    tp_group=self.dims.tp_group())
            else:
                per_token = vocab_parallel_token_loss(output_tensor, labels, vocab)
                loss_sum, count = masked_loss_sum(per_token, batch["loss_mask"])
            return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(),
                                                             count.to(loss_sum.dtype)])}

        return output, loss_func

    def __call__(self, dataset, rows: list[list[int]], forward_only: bool = True
                 ) -> torch.Tensor:
        """``[loss_sum, token_count]`` of these micro-batches (this DP rank's rows), summed over
        micro-batches and data-parallel ranks, on every rank; with ``forward_only=False`` the
        gradients are accumulated into the model's buffers as in a training step."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        micro = self.microbatches(dataset, rows)
        iters = [iter(micro) for _ in self.model]
        out = get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=iters if len(self.model) > 1 else iters[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(micro), seq_length=self.cfg.seq_length,
            micro_batch_size=self.cfg.micro_batch_size, forward_only=forward_only)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.dims.is_last_stage:
            for item in out:
                total += item["lm loss"].to(total)
        for group in self.dims.loss_groups():
            torch.distributed.all_reduce(total, group=group)
        return total
