"""The two ways HF checkpoints store routed experts, and a source that reads either as the other.

Weight tables (``architectures/*.py``) name experts **per expert**, as ``save_pretrained``
writes them (transformers 5 converts on save)::

    model.layers.3.mlp.experts.7.gate_proj.weight   [F, D]
    model.layers.3.mlp.experts.7.up_proj.weight     [F, D]
    model.layers.3.mlp.experts.7.down_proj.weight   [D, F]

Newer checkpoints, and transformers 5's modules in memory, hold them **fused**, one 3-D tensor
per kind for all experts of a layer, each expert's parts stacked along the rows::

    model.layers.3.mlp.experts.gate_up_proj  [E, 2F, D]   expert e = [gate_e; up_e]
    model.layers.3.mlp.experts.down_proj     [E, D, F]    expert e = down_e

An architecture declares its fused form as data (:class:`FusedExpertLayout`, plus names that
differ otherwise: Mixtral's ``block_sparse_moe.gate`` is ``mlp.gate`` in memory), and
:class:`ExpertLayoutSource` presents a fused checkpoint under the per-expert names. Expert
``e``'s rows of a ``[E, R, C]`` tensor are one contiguous byte range, so each is one positioned
read of exactly its bytes: converting a fused checkpoint reads every byte once, as for the
per-expert one. Example, E=4, R=2F=32, C=D=64: ``up_2`` is rows 16..31 of expert 2, elements
``(2*32 + 16)*64 .. (2*32 + 32)*64``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Protocol

import torch


@dataclasses.dataclass(frozen=True)
class FusedExperts:
    """One HF tensor ``[E, rows, cols]`` holding ``parts`` of every expert of a layer, stacked
    along the rows in this order (``fused`` has ``{i}``, ``parts`` ``{i}`` and ``{e}``)."""

    fused: str
    parts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class FusedExpertLayout:
    """An architecture's fused expert form: its 3-D tensors, and the other tensors whose name
    differs there, as ``(fused-form name, per-expert-form name)`` with ``{i}``."""

    tensors: tuple[FusedExperts, ...]
    renames: tuple[tuple[str, str], ...] = ()


class TensorSource(Protocol):
    """What conversion reads (``safetensors_io.SafetensorsSource`` has it all)."""

    def names(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def meta(self, name: str) -> torch.Tensor: ...
    def read(self, name: str) -> torch.Tensor: ...
    def read_range(self, name: str, start: int, count: int,
                   shape: tuple[int, ...]) -> torch.Tensor: ...


@dataclasses.dataclass(frozen=True)
class _Slice:
    fused: str
    #: first element and element count of this part inside the fused tensor
    start: int
    count: int
    shape: tuple[int, ...]


def part_slice(fused_shape: tuple[int, ...], expert: int, row_start: int, rows: int
               ) -> tuple[int, int]:
    """``(first element, element count)`` of rows ``row_start .. row_start+rows`` of expert
    ``expert`` in a row-major ``[E, R, C]`` tensor.

    >>> part_slice((4, 32, 64), 2, 16, 16)
    (5120, 1024)
    """
    _, r, c = fused_shape
    return (expert * r + row_start) * c, rows * c


class ExpertLayoutError(ValueError):
    """A fused expert tensor that does not fit the model, or both forms of one tensor."""


class ExpertLayoutSource:
    """``source`` with its fused expert tensors (if any) presented under the per-expert names
    of the weight table; per-expert checkpoints pass through unchanged.

    ``expected`` is the table's ``{per-expert name: shape}`` (``expected_hf_shapes``): a fused
    tensor must hold exactly those parts, or :class:`ExpertLayoutError` names it, its shape and
    the expected one, before anything is read.
    """

    def __init__(self, source: TensorSource, layout: Optional[FusedExpertLayout],
                 num_layers: int, num_experts: int, expected: dict[str, tuple[int, ...]]):
        self.source = source
        self._slices: dict[str, _Slice] = {}
        self._renamed: dict[str, str] = {}  # per-expert name -> name in source
        self.form = "per-expert"
        if layout is None:
            return
        hidden: set[str] = set()
        problems = []
        for layer in range(num_layers):
            for f in layout.tensors:
                name = f.fused.format(i=layer)
                if name not in source:
                    continue
                parts = [[p.format(i=layer, e=e) for p in f.parts] for e in range(num_experts)]
                shapes = [expected.get(p) for p in parts[0]]
                vector = len(shapes) == 1 and shapes[0] is not None and len(shapes[0]) == 1
                if vector:  # one 1-D part per expert ([E, n]: GPT-OSS's expert biases)
                    shapes = [(1, shapes[0][0])]
                if any(s is None or len(s) != 2 for s in shapes):
                    problems.append(f"{name} is not a tensor of this model")
                    continue
                want = (num_experts, sum(s[0] for s in shapes), shapes[0][1])
                have = tuple(source.meta(name).shape)
                if vector and len(have) == 2:
                    have = (have[0], 1, have[1])
                if have != want or any(s[1] != want[2] for s in shapes):
                    problems.append(f"{name} has shape {have}, expected {want} ({num_experts} "
                                    f"experts x [{' + '.join(str(s[0]) for s in shapes)} rows, "
                                    f"{want[2]}])")
                    continue
                for e, names in enumerate(parts):
                    row = 0
                    for part, s in zip(names, shapes):
                        if part in source:
                            problems.append(f"{part} is stored both on its own and in {name}")
                        start, count = part_slice(have, e, row, s[0])
                        self._slices[part] = _Slice(name, start, count,
                                                    (s[1],) if vector else (s[0], s[1]))
                        row += s[0]
                hidden.add(name)
            for fused_name, canonical in layout.renames:
                alt, name = fused_name.format(i=layer), canonical.format(i=layer)
                if alt in source and alt != name:
                    if name in source:
                        problems.append(f"{name} is stored both as itself and as {alt}")
                    self._renamed[name] = alt
                    hidden.add(alt)
        if problems:
            raise ExpertLayoutError("fused expert tensors do not fit the model: "
                                    + "; ".join(problems[:8]))
        self._hidden = hidden
        if self._slices:
            self.form = "fused"

    # ------------------------------------------------------------------ the source interface
    def names(self) -> list[str]:
        hidden = getattr(self, "_hidden", set())
        return ([n for n in self.source.names() if n not in hidden]
                + list(self._renamed) + list(self._slices))

    def __contains__(self, name: str) -> bool:
        return name in self._slices or name in self._renamed or (
            name in self.source and name not in getattr(self, "_hidden", set()))

    def _real(self, name: str) -> str:
        return self._renamed.get(name, self._slices[name].fused if name in self._slices
                                 else name)

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(self._real(name))

    def meta(self, name: str) -> torch.Tensor:
        if name in self._slices:
            return torch.empty(self._slices[name].shape, dtype=self.dtype(name), device="meta")
        return self.source.meta(self._real(name))

    def read(self, name: str) -> torch.Tensor:
        s = self._slices.get(name)
        if s is None:
            return self.source.read(self._real(name))
        return self.source.read_range(s.fused, s.start, s.count, s.shape)

    def read_range(self, name: str, start: int, count: int, shape: tuple[int, ...]
                   ) -> torch.Tensor:
        """Elements ``start .. start+count`` of ``name`` (a fused expert's part too): one
        positioned read, as for any tensor (``rank_shard`` reads a TP rank's rows so)."""
        s = self._slices.get(name)
        if s is None:
            return self.source.read_range(self._real(name), start, count, shape)
        if start < 0 or count < 0 or start + count > s.count:
            raise ExpertLayoutError(f"elements {start}..{start + count} are not inside {name} "
                                    f"{s.shape}")
        return self.source.read_range(s.fused, s.start + start, count, shape)

    @property
    def dir(self):
        return getattr(self.source, "dir", None)
