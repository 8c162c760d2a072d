"""Map between HF tensors and one pipeline stage's per-TP-rank Megatron state dicts.

Both directions take the tensors through callables/dicts, so the same code runs on real
tensors and on ``meta`` tensors (the converter's dry run that validates names and shapes).

With expert parallelism a stage has one file per (TP rank, EP rank), as in Megatron-LM: every
EP rank's file holds the stage's dense tensors (replicated over EP) and its own block of routed
experts. With whole experts (expert TP 1, TP > 1) an EP rank has one file, holding TP rank
``ep_rank mod TP``'s dense shard (``ParallelLayout.file_tp_ranks``); the per-TP-rank lists
here still hold every TP rank, each with the whole experts. ``ep_rank`` selects the block; ``dense`` / ``experts`` select what is mapped, so a
converter builds the dense part once per stage and each EP rank's experts on their own, and an
export reads the dense tensors from EP rank 0's files and every expert exactly once.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from megatron.sft.bridge.architectures.base import ArchitectureSpec
from megatron.sft.runtime.layout import ParallelLayout
from megatron.sft.bridge.model_shape import ModelShape
from megatron.sft.bridge.rules import ShardContext, VocabParallel, WeightRule

TIED_OUTPUT = "output_layer.weight"


def _chunk_rules(spec: ArchitectureSpec, shape: ModelShape, layout: ParallelLayout,
                 pp_rank: int, chunk: int, ep_rank: int = 0, *, dense: bool = True,
                 experts: bool = True) -> Iterator[tuple[WeightRule, str, tuple[str, ...]]]:
    """Yield ``(rule, megatron_name, hf_names)`` for everything one model chunk holds on
    expert-parallel rank ``ep_rank``: ``{i}`` and ``{e}`` expanded (see ``rules``); only the
    routed experts' tensors without ``dense``, none of them without ``experts``."""
    rules = spec.active_rules(shape)
    if dense and layout.has_embedding(pp_rank, chunk):
        for r in rules:
            if r.stage == "first":
                yield r, r.megatron, r.hf
    local_experts = layout.local_experts(shape, ep_rank)
    for local, layer in enumerate(layout.chunk_layers(shape, pp_rank, chunk)):
        for r in rules:
            if not r.per_layer or not r.applies(shape, layer):
                continue
            if not r.per_expert:
                if dense:
                    yield r, r.megatron.format(i=local), tuple(h.format(i=layer) for h in r.hf)
                continue
            for local_e, e in enumerate(local_experts if experts else ()):
                yield (r, r.megatron.format(i=local, e=local_e),
                       tuple(h.format(i=layer, e=e) for h in r.hf))
    if dense and layout.has_output(pp_rank, chunk):
        for r in rules:
            if r.stage == "last":
                yield r, r.megatron, r.hf
        # Tied embeddings with PP>1: the last stage keeps its own copy of the embedding as
        # output_layer.weight (megatron-core keeps the two in sync through the embedding group).
        if shape.tie_word_embeddings and layout.pp > 1:
            emb = next(r for r in rules if r.stage == "first" and isinstance(r, VocabParallel))
            yield emb, TIED_OUTPUT, emb.hf


def expected_hf_shapes(spec: ArchitectureSpec, shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the model needs and its shape, in a stable order (PP=1 traversal)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for rule, _, hf in _chunk_rules(spec, shape, ParallelLayout(), 0, 0):
        for name, dims in zip(hf, rule.hf_shapes(shape)):
            shapes.setdefault(name, dims)
    return shapes


def required_hf_names(spec: ArchitectureSpec, shape: ModelShape) -> list[str]:
    return list(expected_hf_shapes(spec, shape))


def export_plan(spec: ArchitectureSpec, shape: ModelShape, layout: ParallelLayout,
                pp_rank: int, ep_rank: int = 0) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """``(hf_name, chunk_key, megatron_name, hf_shape)`` in the order :func:`stage_to_hf`
    yields them from EP rank ``ep_rank``'s files (the dense tensors come from EP rank 0's);
    planning an export needs no tensor math."""
    plan = []
    for chunk in range(layout.chunks):
        for rule, mname, hf_names in _chunk_rules(spec, shape, layout, pp_rank, chunk, ep_rank,
                                                  dense=ep_rank == 0):
            if mname == TIED_OUTPUT and shape.tie_word_embeddings:
                continue
            for name, dims in zip(hf_names, rule.hf_shapes(shape)):
                plan.append((name, layout.model_key(chunk), mname, dims))
    return plan


def build_stage(
    get_hf: Callable[[str], torch.Tensor],
    spec: ArchitectureSpec,
    shape: ModelShape,
    layout: ParallelLayout,
    pp_rank: int,
    ctx: ShardContext,
    on_tensor: Callable[[str], None] = lambda name: None,
    ep_rank: int = 0,
    *,
    dense: bool = True,
    experts: bool = True,
) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Per TP rank: ``{"model" | "model0".. : state_dict}`` for pipeline stage ``pp_rank`` on
    expert-parallel rank ``ep_rank`` (``dense`` / ``experts``: which part, see the module
    docstring)."""
    ranks: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in range(layout.tp)]
    for chunk in range(layout.chunks):
        key = layout.model_key(chunk)
        for sd in ranks:
            sd[key] = {}
        for rule, mname, hf_names in _chunk_rules(spec, shape, layout, pp_rank, chunk, ep_rank,
                                                  dense=dense, experts=experts):
            tensors = tuple(get_hf(h) for h in hf_names)
            try:
                shards = rule.to_megatron(tensors, ctx.for_rule(rule))
            except (ValueError, RuntimeError) as e:
                shapes = ", ".join(f"{h} {tuple(t.shape)}" for h, t in zip(hf_names, tensors))
                raise ValueError(f"cannot build {mname} from {shapes}: {e}") from None
            for tp_rank in range(layout.tp):  # whole experts (expert TP 1): in every TP rank's
                ranks[tp_rank][key][mname] = shards[tp_rank % len(shards)]
            for h in hf_names:
                on_tensor(h)
    return ranks


def stage_to_hf(
    rank_states: list[dict[str, dict[str, torch.Tensor]]],
    spec: ArchitectureSpec,
    shape: ModelShape,
    layout: ParallelLayout,
    pp_rank: int,
    ctx: ShardContext,
    ep_rank: int = 0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Inverse of :func:`build_stage`: yield ``(hf_name, tensor)`` for one stage from EP rank
    ``ep_rank``'s files: its routed experts, and the dense tensors when ``ep_rank`` is 0."""
    for chunk in range(layout.chunks):
        key = layout.model_key(chunk)
        for rule, mname, hf_names in _chunk_rules(spec, shape, layout, pp_rank, chunk, ep_rank,
                                                  dense=ep_rank == 0):
            if mname == TIED_OUTPUT and shape.tie_word_embeddings:
                continue  # the embedding already produced this HF tensor
            try:
                shards = [rank_states[t][key][mname] for t in rule_tp_ranks(rule, layout,
                                                                           ep_rank)]
            except KeyError:
                raise KeyError(
                    f"checkpoint stage pp={pp_rank} ep={ep_rank} ({key}) has no tensor "
                    f"{mname!r}") from None
            yield from zip(hf_names, rule.to_hf(shards, ctx.for_rule(rule)))


def rule_tp_ranks(rule: WeightRule, layout: ParallelLayout, ep_rank: int) -> list[int]:
    """Which of a stage's per-TP-rank states hold ``rule``'s shards, in shard order: all of
    them, or for a routed expert with whole experts (expert TP 1) the one of EP rank
    ``ep_rank``'s file (``ParallelLayout.file_tp_ranks``)."""
    return layout.file_tp_ranks(ep_rank) if rule.per_expert else list(range(layout.tp))


def name_pairs(spec: ArchitectureSpec, shape: ModelShape, layout: ParallelLayout, pp_rank: int,
               chunk: int, ep_rank: int = 0) -> list[tuple[str, tuple[str, ...]]]:
    """``(megatron name, HF names)`` of everything chunk ``chunk`` of pipeline rank
    ``pp_rank`` holds on expert-parallel rank ``ep_rank``: what the tables say, expanded."""
    return [(m, hf) for _, m, hf in _chunk_rules(spec, shape, layout, pp_rank, chunk, ep_rank)]
