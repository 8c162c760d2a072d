"""Block-FP8 release weights (DeepSeek-V3/R1, Kimi-K2) read as the dequantised model.

The FP8 releases store most linear weights as ``X.weight`` in ``float8_e4m3fn`` plus
``X.weight_scale_inv`` in float32, one scale per ``128 x 128`` block
(``config.json["quantization_config"]["weight_block_size"]``); the true weight is
``fp8.float() * scale`` per block, the last blocks of a row or column cut to the tensor's edge.
Example, a ``[3, 5]`` weight with ``[2, 2]`` blocks has a ``[2, 3]`` scale, and element
``(2, 4)`` takes ``scale[1, 2]``.

:class:`BlockFp8Source` wraps a tensor source (``SafetensorsSource``) and presents every such
pair as one tensor of the run's dtype, dequantised exactly in fp32 and then cast (the same
value as dequantising first and casting after, as the converter does with any weight), one
tensor at a time: ``read`` dequantises a whole tensor, ``read_range`` only the rows it
touches (with their scale rows), so ``--load HF_DIR`` reads a rank's shard of an FP8 release
without the rest. The ``*.weight_scale_inv`` tensors disappear from the names, so coverage
checks see the model the release means. Export writes the run's dtype and drops
``quantization_config`` (``export``); nothing is re-quantised.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

import torch

SCALE_SUFFIX = "_scale_inv"
FP8 = torch.float8_e4m3fn


class Fp8ConfigError(ValueError):
    """A ``quantization_config`` this reader does not dequantise; says which."""


def fp8_block_size(config: dict[str, Any]) -> Optional[tuple[int, int]]:
    """``(rows, cols)`` of the FP8 blocks the config declares, ``None`` when not quantised.

    >>> fp8_block_size({"quantization_config": {"quant_method": "fp8",
    ...                                         "weight_block_size": [128, 128]}})
    (128, 128)
    """
    q = config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        return None  # other formats are other readers' business (or refused by them)
    if q.get("fmt", "e4m3") != "e4m3":
        raise Fp8ConfigError(f"config.json quantization_config fmt={q.get('fmt')!r}: only "
                             "e4m3 FP8 weights are read")
    block = q.get("weight_block_size")
    if not block or len(block) != 2:
        raise Fp8ConfigError("config.json quantization_config is fp8 without "
                             "weight_block_size: only block-scaled FP8 (DeepSeek-V3's "
                             "[128, 128]) is read")
    return int(block[0]), int(block[1])


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor,
                         block: tuple[int, int], row0: int = 0) -> torch.Tensor:
    """fp32 ``weight * scale`` for FP8 ``weight`` rows ``row0 ..`` of the full tensor (its
    scale rows start at block ``row0 // block[0]`` of ``scale_inv``)."""
    rows, cols = weight.shape
    br, bc = block
    first = row0 // br
    scale = scale_inv[first:(row0 + rows - 1) // br + 1].to(torch.float32)
    scale = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    offset = row0 - first * br
    return weight.to(torch.float32) * scale[offset:offset + rows, :cols]


class BlockFp8Source:
    """``source`` with FP8 ``weight`` + ``weight_scale_inv`` pairs read as ``dtype`` tensors
    (the module docstring); every other tensor as it is."""

    def __init__(self, source, block: tuple[int, int], dtype: Optional[torch.dtype] = None):
        self.source = source
        self.block = block
        self.scales: dict[str, str] = {}
        for name in source.names():
            if name.endswith(SCALE_SUFFIX) and source.dtype(name).is_floating_point:
                base = name[: -len(SCALE_SUFFIX)]
                if base in source and source.dtype(base) == FP8:
                    self.scales[base] = name
        for name in self.scales:
            shape, scale = tuple(source.meta(name).shape), tuple(source.meta(self.scales[name])
                                                                  .shape)
            want = tuple(-(-n // b) for n, b in zip(shape, block))
            if len(shape) != 2 or scale != want:
                raise Fp8ConfigError(f"{source.dir}: {self.scales[name]} has shape {scale}, "
                                     f"expected {want} for {name} {shape} in blocks of {block}")
        orphans = [n for n in source.names() if source.dtype(n) == FP8 and n not in self.scales]
        if orphans:
            raise Fp8ConfigError(f"{source.dir}: FP8 tensors without a {SCALE_SUFFIX}: "
                                 + ", ".join(orphans[:6]))
        #: the dequantised tensors' dtype: given, else that of most unquantised tensors
        self.out_dtype = dtype or self._dominant_dtype()
        self._hidden = set(self.scales.values())

    def _dominant_dtype(self) -> torch.dtype:
        counts = Counter(self.source.dtype(n) for n in self.source.names()
                         if n not in self.scales and not n.endswith(SCALE_SUFFIX)
                         and self.source.dtype(n).is_floating_point)
        return counts.most_common(1)[0][0] if counts else torch.bfloat16

    # ------------------------------------------------------------------ the source interface
    def names(self) -> list[str]:
        return [n for n in self.source.names() if n not in self._hidden]

    def __contains__(self, name: str) -> bool:
        return name in self.source and name not in self._hidden

    def dtype(self, name: str) -> torch.dtype:
        return self.out_dtype if name in self.scales else self.source.dtype(name)

    def meta(self, name: str) -> torch.Tensor:
        if name not in self.scales:
            return self.source.meta(name)
        return torch.empty(tuple(self.source.meta(name).shape), dtype=self.out_dtype,
                           device="meta")

    def read(self, name: str) -> torch.Tensor:
        if name not in self.scales:
            return self.source.read(name)
        return dequantize_block_fp8(self.source.read(name), self.source.read(self.scales[name]),
                                    self.block).to(self.out_dtype)

    def read_range(self, name: str, start: int, count: int, shape: tuple[int, ...]
                   ) -> torch.Tensor:
        """Elements ``start .. start+count`` (row-major): the rows they touch are read and
        dequantised with their scale rows, then cut to the range."""
        if name not in self.scales:
            return self.source.read_range(name, start, count, shape)
        rows, cols = tuple(self.source.meta(name).shape)
        if count == 0:
            return torch.empty(shape, dtype=self.out_dtype)
        first, last = start // cols, (start + count - 1) // cols
        n = last - first + 1
        fp8 = self.source.read_range(name, first * cols, n * cols, (n, cols))
        scale = self.source.read(self.scales[name])
        values = dequantize_block_fp8(fp8, scale, self.block, row0=first).reshape(-1)
        begin = start - first * cols
        return values[begin:begin + count].reshape(shape).to(self.out_dtype)

    @property
    def dir(self):
        return getattr(self.source, "dir", None)


def dequantizing_source(source, config: dict[str, Any], dtype: Optional[torch.dtype] = None):
    """``source`` as the model it stands for: dequantised when ``config`` declares block FP8,
    else unchanged."""
    block = fp8_block_size(config)
    return source if block is None else BlockFp8Source(source, block, dtype)
