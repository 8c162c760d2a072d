"""Grouped-query attention's K/V heads repeated to the query heads, for kernels that take one
head count (pure)."""

from __future__ import annotations

import torch


def repeat_kv(k: torch.Tensor, hq: int, dim: int = -2) -> torch.Tensor:
    """``k [..., hkv, d]`` with each head repeated ``hq // hkv`` times along ``dim``
    (``hkv=2, hq=4``: heads ``[a, b]`` -> ``[a, a, b, b]``, the grouping of HF's GQA)."""
    return k if k.shape[dim] == hq else k.repeat_interleave(hq // k.shape[dim], dim=dim)
