"""Transformer Engine layer spec when TE imports, megatron-core's local spec otherwise."""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install must not take the CPU path down with it
        return False
    return True


def resolve_spec_kind(use_te: Optional[bool]) -> str:
    """``None`` = auto. Asking for TE without it installed is an error, not a silent fallback."""
    if use_te is None:
        import torch

        return "te" if torch.cuda.is_available() and transformer_engine_available() else "local"
    if use_te and not transformer_engine_available():
        raise RuntimeError(
            "--transformer-impl transformer_engine was requested but transformer_engine is not "
            "importable; use the NVIDIA PyTorch container or --transformer-impl local"
        )
    return "te" if use_te else "local"


def gpt_layer_spec(spec_kind: str, qk_layernorm: bool):
    if spec_kind == "te":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
