"""One rank's Megatron tensors read straight from HF safetensors: only the bytes of its shard.

The converter builds every TP rank of a stage from whole HF tensors (``build_stage``). A
training rank loading an HF directory needs only its own shard, and must get exactly the
converter's values. Every weight rule (``rules.py``) only moves rows or columns (split, fuse,
reorder) or appends zero rows (vocabulary padding), so its output is a *gather* of its inputs.
Which gather is found by running the rule itself on a small **index probe**, a tensor whose
values are the HF row numbers (1-based, 0 means "a padding row"); the rows are then read with
positioned reads of just those byte ranges. The rules' math stays written once.

Worked example, a fused QKV weight, 4 query heads, 2 KV groups, head_dim 1, TP 2, rank 1::

    probes   q [1 2 3 4], k [5 6], v [7 8]          (shape [rows, 1])
    rule     fused [1 2 5 7 | 3 4 6 8] -> rank 1 gets [3 4 6 8]
    reads    q rows 2..3, k row 1, v row 1          (three runs, one positioned read each)

A rule that splits columns (row-parallel ``linear_proj`` / ``linear_fc2``, TP split on dim 1,
found by running the rule on ``meta`` tensors) is probed along the columns instead; its rows are
read in blocks of at most ``BLOCK_BYTES`` and the rank's columns kept. Either way the shard is
allocated once and filled a block at a time, so memory stays one block above the shard. Casting to the checkpoint dtype happens after the gather, which is the same
value as casting first (casting is per element).
"""

from __future__ import annotations

from typing import Iterator

import torch

from megatron.sft.bridge.architectures.base import ArchitectureSpec
from megatron.sft.bridge.convert import refuse_non_finite
from megatron.sft.bridge.model_shape import ModelShape
from megatron.sft.bridge.rules import ShardContext, WeightRule
from megatron.sft.bridge.stage_mapping import _chunk_rules
from megatron.sft.runtime.layout import ParallelLayout

#: rows read at once when a rank needs only some columns of a tensor
BLOCK_BYTES = 32 << 20


def _runs(codes: list[int], offsets: list[int]) -> list[tuple[int, int, int]]:
    """1-based global indices (0 = padding) -> ``(tensor, first, count)`` runs, tensor -1 for
    padding.

    >>> _runs([3, 4, 6, 8, 0, 0], [0, 4, 6])
    [(0, 2, 2), (1, 1, 1), (2, 1, 1), (-1, 0, 2)]
    """
    runs: list[list[int]] = []
    for code in codes:
        if code == 0:
            j, row = -1, 0
        else:
            j = max(k for k, off in enumerate(offsets) if off < code)
            row = code - 1 - offsets[j]
        last = runs[-1] if runs else None
        if last and last[0] == j and (j == -1 or last[1] + last[2] == row):
            last[2] += 1
        else:
            runs.append([j, row, 1])
    return [tuple(r) for r in runs]


def _probe(rule: WeightRule, metas: tuple[torch.Tensor, ...], ctx: ShardContext, tp_rank: int,
           axis: int) -> list[int]:
    """The 1-based HF indices (rows for ``axis`` 0, columns for 1) that make up ``tp_rank``'s
    shard along ``axis``, in order."""
    probes, offset = [], 0
    for m in metas:
        n = m.shape[axis]
        shape = [1] * m.dim()
        shape[axis] = n
        probes.append(torch.arange(offset + 1, offset + n + 1, dtype=torch.float64)
                      .reshape(shape))
        offset += n
    out = rule.to_megatron(tuple(probes), ctx)[tp_rank]
    if out.numel() != out.shape[axis]:
        raise ValueError(f"table error: {rule.megatron} mixes rows and columns; rank_shard "
                         "can only gather whole rows or whole columns")
    return [int(v) for v in out.reshape(-1).tolist()]


def _split_axis(rule: WeightRule, metas: tuple[torch.Tensor, ...], ctx: ShardContext,
                tp_rank: int) -> tuple[int, torch.Tensor]:
    """``(axis, shard as a meta tensor)``: axis 1 when the rule splits columns (same rows in as
    out), else 0."""
    out = rule.to_megatron(metas, ctx)[tp_rank]
    if out.dim() == 2 and all(m.dim() == 2 for m in metas) and \
            any(out.shape[1] != m.shape[1] for m in metas):
        return 1, out
    return 0, out


def shard_tensor(source, rule: WeightRule, hf_names: tuple[str, ...], ctx: ShardContext,
                 tp_rank: int) -> torch.Tensor:
    """``rule.to_megatron(<the HF tensors>, ctx)[tp_rank]``, reading only what that needs.
    The shard is allocated once and filled run by run, ``BLOCK_BYTES`` at a time, so memory is
    the shard plus one block."""
    if getattr(rule, "reads_whole", False):  # transposing rules: one GPT-OSS expert's block
        return rule.to_megatron(tuple(source.read(n) for n in hf_names), ctx)[tp_rank]
    metas = tuple(source.meta(n) for n in hf_names)
    axis, shard = _split_axis(rule, metas, ctx, tp_rank)
    codes = _probe(rule, metas, ctx, tp_rank, axis)
    offsets, total = [], 0
    for m in metas:
        offsets.append(total)
        total += m.shape[axis]
    out = torch.empty(tuple(shard.shape), dtype=metas[0].dtype)
    at = 0
    for j, first, count in _runs(codes, offsets):
        target = out.narrow(axis, at, count)
        if j == -1:
            target.zero_()
        elif axis == 0:
            _read_rows(source, hf_names[j], metas[j], first, target)
        else:
            _read_columns(source, hf_names[j], metas[j], first, target)
        at += count
    return out


def _read_rows(source, name: str, meta: torch.Tensor, first: int, out: torch.Tensor) -> None:
    """Rows ``first ..`` of ``name`` into ``out`` (its rows), a block of rows per read."""
    per_row = int(meta[0].numel()) if meta.dim() > 1 else 1
    block = max(1, BLOCK_BYTES // max(1, per_row * meta.element_size()))
    for r0 in range(0, out.shape[0], block):
        n = min(block, out.shape[0] - r0)
        out[r0:r0 + n] = source.read_range(name, (first + r0) * per_row, n * per_row,
                                           (n,) + tuple(meta.shape[1:]))


def _read_columns(source, name: str, meta: torch.Tensor, first: int, out: torch.Tensor
                  ) -> None:
    """Columns ``first ..`` of ``name`` into ``out``, whole rows read a block at a time."""
    rows, cols = meta.shape
    count = out.shape[1]
    block = max(1, BLOCK_BYTES // max(1, cols * meta.element_size()))
    for r0 in range(0, rows, block):
        n = min(block, rows - r0)
        out[r0:r0 + n] = source.read_range(name, r0 * cols, n * cols,
                                           (n, cols))[:, first:first + count]


def _refuse_non_finite(name: str, t: torch.Tensor, fix: str) -> None:
    """``convert.refuse_non_finite`` checked a block of rows at a time (its boolean masks of a
    whole embedding would cost half the shard again); the error, if any, counts the whole
    tensor."""
    if not t.is_floating_point() or t.dim() == 0:
        return refuse_non_finite(name, t, fix)
    rows = max(1, BLOCK_BYTES // max(1, t[0].numel() * t.element_size()) if t.dim() > 1
               else BLOCK_BYTES // t.element_size())
    for r0 in range(0, t.shape[0], rows):
        if not bool(torch.isfinite(t[r0:r0 + rows]).all()):
            refuse_non_finite(name, t, fix)


def rank_tensors(source, spec: ArchitectureSpec, shape: ModelShape, layout: ParallelLayout,
                 ctx: ShardContext, tp_rank: int, pp_rank: int, ep_rank: int,
                 dtype: torch.dtype) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``(chunk key, megatron name, tensor)`` for everything rank (``tp_rank``, ``pp_rank``,
    ``ep_rank``) holds, in checkpoint naming and cast to ``dtype``: the values the converter
    writes into that rank's file, one tensor at a time."""
    for chunk in range(layout.chunks):
        key = layout.model_key(chunk)
        for rule, mname, hf_names in _chunk_rules(spec, shape, layout, pp_rank, chunk, ep_rank):
            rule_ctx = ctx.for_rule(rule)  # experts over expert TP (whole with expert TP 1)
            t = shard_tensor(source, rule, hf_names, rule_ctx, tp_rank % rule_ctx.tp_size)
            want = torch.float32 if spec.keeps_fp32(mname) else dtype
            if t.is_floating_point() and t.dtype != want:
                t = t.to(want)
            _refuse_non_finite(mname, t, f"the HF checkpoint in {source.dir} is damaged: "
                                        "download or copy it again")
            yield key, mname, t


def rank_state(source, spec: ArchitectureSpec, shape: ModelShape, layout: ParallelLayout,
               ctx: ShardContext, tp_rank: int, pp_rank: int, ep_rank: int,
               dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`rank_tensors` as the ``{"model" | "model0".. : state_dict}`` of a rank file."""
    out: dict[str, dict[str, torch.Tensor]] = {layout.model_key(c): {}
                                               for c in range(layout.chunks)}
    for key, name, t in rank_tensors(source, spec, shape, layout, ctx, tp_rank, pp_rank,
                                     ep_rank, dtype):
        out[key][name] = t
    return out
