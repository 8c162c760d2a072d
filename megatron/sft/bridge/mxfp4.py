"""GPT-OSS's MXFP4 release weights, dequantised as they are read (one expert block at a time).

The released gpt-oss checkpoints store the routed experts' weights (not their biases) as
MXFP4 (``config.json`` ``quantization_config.quant_method = "mxfp4"``)::

    model.layers.{i}.mlp.experts.gate_up_proj_blocks  uint8 [E, 2F, H / 32, 16]
    model.layers.{i}.mlp.experts.gate_up_proj_scales  uint8 [E, 2F, H / 32]
    model.layers.{i}.mlp.experts.down_proj_blocks     uint8 [E, H, F / 32, 16]
    model.layers.{i}.mlp.experts.down_proj_scales     uint8 [E, H, F / 32]

Each byte of ``*_blocks`` holds two E2M1 values, the low nibble first; a nibble indexes
:data:`E2M1` (sign bit 3). Each ``*_scales`` byte is an E8M0 exponent with bias 127 shared by
the 32 values of its group, so ``value = E2M1[nibble] * 2^(scale - 127)``. The rows are the
output dimension: dequantised ``[E, R, C]`` is transposed to the layout the unquantised model
holds (``gate_up_proj [E, H, 2F]``, ``down_proj [E, F, H]``). Example, one group whose first
byte is ``0x2F`` with scale 128: values ``E2M1[0xF] * 2 = -12`` then ``E2M1[0x2] * 2 = 2``.

:class:`Mxfp4Source` presents each ``X_blocks`` / ``X_scales`` pair as the bf16 tensor ``X``
(every E2M1 value times a power of two is exact in bf16), reading and dequantising only the
experts a read asks for. Export writes bf16 (or the run's dtype) and drops
``quantization_config``: the exported model is not quantised.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

#: E2M1 code -> value
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCKS, SCALES = "_blocks", "_scales"
#: values per scale
GROUP = 32


class Mxfp4Error(ValueError):
    """MXFP4 tensors that do not pair up or do not have the released shapes."""


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor,
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``blocks [..., R, G, 16]`` uint8, ``scales [..., R, G]`` uint8 -> ``[..., G * 32, R]``
    in ``dtype`` (the last two axes transposed, see the module docstring)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP // 2:
        raise Mxfp4Error(f"MXFP4 blocks {tuple(blocks.shape)} and scales "
                         f"{tuple(scales.shape)} do not pair up ([..., G, 16] and [..., G])")
    lut = torch.tensor(E2M1, dtype=torch.float32)
    b = blocks.to(torch.uint8)
    values = torch.stack([lut[(b & 0x0F).long()], lut[(b >> 4).long()]], -1)  # [..., G, 16, 2]
    values = values.reshape(*b.shape[:-1], GROUP)
    values = torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1))
    out = values.reshape(*b.shape[:-2], b.shape[-2] * GROUP)  # [..., R, C]
    return out.transpose(-1, -2).contiguous().to(dtype)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse layout: ``[..., C, R]`` -> ``(blocks [..., R, C / 32, 16], scales
    [..., R, C / 32])``, each group's scale the smallest power of two that fits its largest
    magnitude into E2M1's 6, values rounded to the nearest E2M1 value (ties to the lower code).
    Writes the released layout for tests and benchmarks (not used by conversion)."""
    x = weight.transpose(-1, -2).float()  # [..., R, C]
    if x.shape[-1] % GROUP:
        raise Mxfp4Error(f"MXFP4 needs the input dimension {x.shape[-1]} divisible by {GROUP}")
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // GROUP, GROUP)
    amax = groups.abs().amax(-1).clamp(min=2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.ldexp(torch.ones_like(exp), exp.int()).unsqueeze(-1)
    lut = torch.tensor(E2M1)
    codes = (scaled.unsqueeze(-1) - lut).abs().argmin(-1).to(torch.uint8)  # [..., G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8)


class Mxfp4Source:
    """``source`` (a ``SafetensorsSource``) with every ``X_blocks`` + ``X_scales`` pair shown as
    the dequantised ``X`` (``torch.bfloat16``); a source without any passes through as it is
    (use :func:`mxfp4_source`)."""

    def __init__(self, source, dtype: torch.dtype = torch.bfloat16):
        self.source, self.out_dtype = source, dtype
        self._pairs: dict[str, tuple[str, str]] = {}
        names = set(source.names())
        for n in sorted(names):
            if not n.endswith(BLOCKS):
                continue
            base = n[: -len(BLOCKS)]
            if base + SCALES not in names:
                raise Mxfp4Error(f"{n} has no {base + SCALES}")
            if base in names:
                raise Mxfp4Error(f"{base} is stored both quantised ({n}) and as itself")
            b, s = source.meta(n), source.meta(base + SCALES)
            if b.dim() != 4 or tuple(b.shape[:-1]) != tuple(s.shape) or b.shape[-1] != 16:
                raise Mxfp4Error(f"{n} {tuple(b.shape)} / {base + SCALES} {tuple(s.shape)}: "
                                 "expected [E, R, G, 16] and [E, R, G]")
            self._pairs[base] = (n, base + SCALES)
        self._hidden = {x for pair in self._pairs.values() for x in pair}
        lost = sorted(n for n in names if n.endswith(SCALES) and n not in self._hidden)
        if lost:
            raise Mxfp4Error(f"{lost[0]} has no {lost[0][: -len(SCALES)] + BLOCKS}")

    @property
    def quantized(self) -> list[str]:
        return sorted(self._pairs)

    def names(self) -> list[str]:
        return [n for n in self.source.names() if n not in self._hidden] + list(self._pairs)

    def __contains__(self, name: str) -> bool:
        return name in self._pairs or (name in self.source and name not in self._hidden)

    def dtype(self, name: str) -> torch.dtype:
        return self.out_dtype if name in self._pairs else self.source.dtype(name)

    def _shape(self, name: str) -> tuple[int, ...]:
        e, r, g, _ = self.source.meta(self._pairs[name][0]).shape
        return (e, g * GROUP, r)

    def meta(self, name: str) -> torch.Tensor:
        if name not in self._pairs:
            return self.source.meta(name)
        return torch.empty(self._shape(name), dtype=self.out_dtype, device="meta")

    def _experts(self, name: str, first: int, count: int) -> torch.Tensor:
        """Experts ``first .. first + count`` dequantised, ``[count, C, R]``."""
        bn, sn = self._pairs[name]
        b, s = self.source.meta(bn), self.source.meta(sn)
        per_b, per_s = math.prod(b.shape[1:]), math.prod(s.shape[1:])
        blocks = self.source.read_range(bn, first * per_b, count * per_b,
                                        (count,) + tuple(b.shape[1:]))
        scales = self.source.read_range(sn, first * per_s, count * per_s,
                                        (count,) + tuple(s.shape[1:]))
        return dequantize_mxfp4(blocks, scales, self.out_dtype)

    def read(self, name: str) -> torch.Tensor:
        if name not in self._pairs:
            return self.source.read(name)
        return self._experts(name, 0, self._shape(name)[0])

    def read_range(self, name: str, start: int, count: int, shape: tuple[int, ...]
                   ) -> torch.Tensor:
        """Elements ``start .. start + count`` (row-major over the dequantised ``[E, C, R]``):
        only the experts they fall in are read and dequantised (one, for a per-expert read)."""
        if name not in self._pairs:
            return self.source.read_range(name, start, count, shape)
        e, c, r = self._shape(name)
        per = c * r
        if start < 0 or count < 0 or start + count > e * per:
            raise Mxfp4Error(f"elements {start}..{start + count} are not inside {name}")
        first, last = start // per, max(start, start + count - 1) // per
        block = self._experts(name, first, last - first + 1).reshape(-1)
        offset = start - first * per
        return block[offset:offset + count].reshape(shape).clone()

    @property
    def dir(self):
        return getattr(self.source, "dir", None)


def mxfp4_source(source):
    """``source`` with its MXFP4 tensors dequantised, or ``source`` itself without any."""
    if not any(n.endswith(BLOCKS) for n in source.names()):
        return source
    return Mxfp4Source(source)


def drop_quantization_config(config: dict, log=print) -> Optional[dict]:
    """Remove ``quantization_config`` from an exported ``config.json`` (saying so): export
    writes unquantised weights. Returns what was removed."""
    removed = config.pop("quantization_config", None)
    if removed is not None:
        log(f"export: config.json without quantization_config "
            f"({removed.get('quant_method', '?')}): the weights are written unquantised")
    return removed
