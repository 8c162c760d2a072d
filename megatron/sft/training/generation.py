"""Greedy decoding on the training model, at any layout it trains in (TP, PP with virtual stages,
EP, CP, sequence parallelism, FSDP, LoRA): one full forward per new token through megatron-core's
real pipeline schedule, no KV cache (see ``benchmarks/bench_eval_generate.py`` for what that
costs and why it is enough).

Per step (every rank runs the same steps on the same rows, so every collective matches):

1. the active rows (prompt + tokens so far) are right-padded (:mod:`~megatron.sft.training.greedy`)
   to a length context and sequence parallelism can cut, and cut into micro-batches (``PP`` of
   them with a pipeline, as the interleaved schedule needs at least ``PP``);
2. each micro-batch goes through the schedule as an unpacked batch, built as the trainer builds
   its own (this CP rank's tokens, the attention backend's inputs, MoE's padding mask);
3. on the last stage the output layer computes logits only at each row's last real token: its
   forward is swapped, for the call, for one that gathers the sequence-parallel hidden states,
   picks those positions (zeros where another CP rank holds the position) and applies the same
   weight (under FSDP the one its hooks gathered);
4. the ``[rows, vocab/TP]`` logits are summed over CP (one rank holds each position, the others
   add zeros: exact), gathered over TP, cut to the real vocabulary and ``argmax``-ed (the first
   index among equal maxima, as ``torch.argmax`` in ``transformers``' greedy search);
5. the last rank's choice is broadcast to every rank, which appends it.

Training is not changed: the model is put back in train mode by the next step as always, the
output layer's forward is restored, and the CPU, CUDA and megatron-core tensor-parallel RNG
states are restored (greedy decoding draws nothing, and eval mode has no dropout; the restore
makes that independent of what the model does).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Optional, Sequence

import torch

from megatron.sft.model.moe import settings as moe
from megatron.sft.runtime.wrapping import unwrap_model
from megatron.sft.training.batch import local_micro_batch
from megatron.sft.training.greedy import GreedyState, pad_rows


def _select_and_project(self, input_, weight=None, runtime_gather_output=None):
    """The output layer's forward while generating: logits ``[n, 1, vocab/TP]`` at the flat
    positions ``self._generation_index`` (``-1``: not on this rank) of ``input_`` ``[s', b, h]``."""
    hidden = input_
    if getattr(self, "sequence_parallel", False):
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    flat = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])  # [b * s, h], row-major
    index = self._generation_index.to(flat.device)
    picked = flat[index.clamp(min=0)] * (index >= 0).unsqueeze(1).to(flat.dtype)
    w = self.weight if weight is None else weight
    logits = torch.matmul(picked, w.t())
    if getattr(self, "bias", None) is not None:
        logits = logits + self.bias
    return logits.unsqueeze(1), None


@contextlib.contextmanager
def last_positions_only(chunks: list):
    """The output layers of ``chunks`` compute logits only at the positions each micro-batch
    names (see :func:`_select_and_project`); their own forward is back afterwards."""
    swapped = []
    for chunk in chunks:
        layer = getattr(unwrap_model(chunk), "output_layer", None)
        if layer is not None:
            swapped.append((layer, layer.__dict__.get("forward")))
            layer.forward = types.MethodType(_select_and_project, layer)
    try:
        yield
    finally:
        for layer, previous in swapped:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous
            layer.__dict__.pop("_generation_index", None)


@contextlib.contextmanager
def rng_state_kept():
    """CPU, CUDA and megatron-core's tensor-parallel RNG states as they were before."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    tracker = get_cuda_rng_tracker()
    states = tracker.get_states()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        tracker.set_states(states)


class GreedyGenerator:
    """``generate(prompts, max_new_tokens, stop_ids)`` on the trainer's wrapped chunks; a
    collective: every rank calls it with the same arguments and gets the same result."""

    def __init__(self, model: list, shape, impl, dims, tconfig, device):
        self.model, self.shape, self.impl, self.dims = model, shape, impl, dims
        self.tconfig, self.device = tconfig, device
        #: rows are padded to a multiple of this: 2·CP chunks per row, each split over TP
        #: under sequence parallelism
        cp = dims.cp_size
        self.multiple = (2 * cp if cp > 1 else 1) * \
            (dims.layout.tp if tconfig.sequence_parallel else 1)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_ids: Sequence[int] = ()) -> GreedyState:
        state = GreedyState([list(p) for p in prompts], max_new_tokens, tuple(stop_ids))
        for m in self.model:
            m.eval()
        with rng_state_kept(), last_positions_only(self.model):
            while not state.finished:
                rows = state.active()
                state.step(rows, self.next_tokens(state.sequences(rows)))
        return state

    # ------------------------------------------------------------------ one step
    def next_tokens(self, sequences: list[list[int]]) -> list[int]:
        """The greedy next token of each sequence (one forward of all of them)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        n = len(sequences)
        pp = self.dims.layout.pp
        count = pp if pp > 1 else 1  # the interleaved schedule wants >= PP micro-batches
        mbs = -(-n // count)
        rows = list(sequences) + [sequences[0]] * (count * mbs - n)  # filler rows, dropped
        padded, last = pad_rows(rows, self.multiple)
        length = len(padded[0])
        micro = [self._micro_batch(padded[i * mbs:(i + 1) * mbs], last[i * mbs:(i + 1) * mbs])
                 for i in range(count)]
        collected: list[torch.Tensor] = []

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            layer = getattr(unwrap_model(model), "output_layer", None)
            if layer is not None:
                layer._generation_index = batch["select"]
            attention = batch["attention"]
            extra = moe.routing_inputs(batch, self.shape, model, attention.flatten_rows,
                                       self.tconfig.sequence_parallel)
            tokens, positions = batch["tokens"], batch["position_ids"]
            if attention.flatten_rows:
                tokens, positions = tokens.reshape(1, -1), positions.reshape(1, -1)
            output = model(tokens, positions, attention_mask=attention.attention_mask,
                           packed_seq_params=attention.packed_seq_params, **extra)

            def collect(output_tensor):
                collected.append(output_tensor.reshape(-1, output_tensor.shape[-1]).float())
                return output_tensor.new_zeros(()), torch.tensor(1), {}

            return output, collect

        iters = [iter(micro) for _ in self.model]
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iters if len(self.model) > 1 else iters[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=count, seq_length=length, micro_batch_size=mbs,
            forward_only=True)
        chosen = torch.zeros(n, dtype=torch.int64, device=self.device)
        if self.dims.is_last_stage:
            chosen = self._argmax(torch.cat(collected)[:n])
        if self.dims.world_size > 1:  # the last rank's choice, everywhere
            torch.distributed.broadcast(chosen, src=self.dims.world_size - 1)
        return chosen.tolist()

    def _micro_batch(self, rows: list[list[int]], last: list[int]) -> dict[str, Any]:
        """One unpacked micro-batch as the trainer builds it (this CP rank's tokens), plus
        ``select``: the flat position of each row's last real token among this rank's
        ``[b, s / CP]`` tokens, ``-1`` where another CP rank holds it."""
        b, s = len(rows), len(rows[0])
        tokens = torch.tensor(rows, dtype=torch.int64)
        lengths = torch.tensor([p + 1 for p in last], dtype=torch.int32)
        batch = {"tokens": tokens, "labels": torch.zeros_like(tokens),
                 "loss_mask": (torch.arange(s).unsqueeze(0) < lengths.unsqueeze(1)).float(),
                 "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
                 "cu_seqlens": torch.stack([torch.zeros_like(lengths), lengths], dim=1)}
        batch = {k: v.to(self.device) for k, v in batch.items()}
        # MoE: the routing padding mask of the whole rows, cut with the tokens below, as the
        # trainer's batches (the positions after each prompt are padding to the router)
        batch.update(moe.routing_padding(batch, self.shape))
        attention = self.impl.attention_inputs(None, b, s, self.shape.sliding_window,
                                               cp_size=self.dims.cp_size,
                                               cp_rank=self.dims.cp_rank)
        targets = torch.tensor([i * s + p for i, p in enumerate(last)], device=self.device)
        if attention.local_index is None:
            select = targets
        else:
            local = attention.local_index.reshape(-1).to(self.device)
            hit = local.unsqueeze(0) == targets.unsqueeze(1)  # [b, b * s / CP]
            select = torch.where(hit.any(1), hit.int().argmax(1), torch.full_like(targets, -1))
        batch = local_micro_batch(batch, attention.local_index)
        batch["attention"], batch["select"] = attention, select
        return batch

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """``[n, vocab/TP]`` local logits -> ``[n]`` greedy tokens over the real vocabulary."""
        if self.dims.cp_size > 1:
            torch.distributed.all_reduce(logits, group=self.dims.cp_group())
        tp = self.dims.layout.tp
        if tp > 1:
            parts = [torch.empty_like(logits) for _ in range(tp)]
            torch.distributed.all_gather(parts, logits.contiguous(), group=self.dims.tp_group())
            logits = torch.cat(parts, dim=-1)
        return logits[:, :self.shape.vocab_size].argmax(dim=-1)

