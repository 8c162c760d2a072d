"""YaRN RoPE (GPT-OSS's ``rope_type: yarn``) on megatron-core's plain ``RotaryEmbedding``.

megatron-core 0.16.1's ``YarnRotaryEmbedding`` reads its settings from fields only
``MLATransformerConfig`` has, and ``GPTModel`` drops its attention factor outside MLA. YaRN for
ordinary attention is two things, both applied here: the inverse frequencies blended between
interpolated (``1 / (factor * theta^(2j/d))``) and extrapolated (``1 / theta^(2j/d)``) by a
linear ramp over the dimensions between the correction range ``[low, high]``; and transformers'
``attention_factor`` ``m`` multiplying cos and sin, so every score ``q.k`` by ``m^2``: the
softmax scale becomes ``m^2 / sqrt(d)``.

Example, GPT-OSS (theta 150000, d 64, factor 32, original 4096, beta 32/1, no truncation):
``m = 0.1 ln 32 + 1 = 1.3466``; dimensions below ``low`` keep their frequency, those above
``high`` are divided by 32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    #: round the correction range to integers (transformers' ``truncate``, default true)
    truncate: bool = True
    #: multiplies cos and sin; ``None``: ``0.1 ln(factor) + 1`` (or the mscale ratio)
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None

    def scores_factor(self) -> float:
        """``m``: what cos and sin are multiplied by."""
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def get(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return get(self.factor, self.mscale) / get(self.factor, self.mscale_all_dim)
        return get(self.factor)


def yarn_inv_freq(cfg: YarnConfig, theta: float, dim: int) -> torch.Tensor:
    """``[dim / 2]`` fp32 inverse frequencies (see the module docstring)."""
    def correction_dim(rotations):
        return dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi)) \
            / (2 * math.log(theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 - ramp
    return (1.0 / (cfg.factor * pos)) * ramp + (1.0 / pos) * extrapolation


def apply_yarn(model, cfg: YarnConfig, theta: float, dim: int) -> None:
    """Give ``model``'s (a ``GPTModel``'s) rotary embedding YaRN's frequencies."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        return
    rope.inv_freq = yarn_inv_freq(cfg, theta, dim).to(rope.inv_freq.device)
    rope.forward.cache_clear()
