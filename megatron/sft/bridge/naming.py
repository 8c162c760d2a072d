"""Checkpoint tensor names <-> the names of the layer spec actually built (pure).

Checkpoints use the Transformer Engine spec's names, where each pre-norm is fused into the
following linear (``linear_qkv.layer_norm_weight``), as Megatron-LM checkpoints from GPU runs do.
megatron-core's local spec (no TE) keeps separate norm modules; this renames between the two.
"""

from __future__ import annotations

from typing import Any

#: (checkpoint / TE suffix, local-spec suffix)
_LOCAL_RENAMES = (
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
    (".self_attention.linear_qkv.layer_norm_bias", ".input_layernorm.bias"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_bias", ".pre_mlp_layernorm.bias"),
)


def _rename(name: str, pairs) -> str:
    for src, dst in pairs:
        if name.endswith(src):
            return name[: -len(src)] + dst
    return name


def checkpoint_to_model(state: dict[str, Any], spec_kind: str) -> dict[str, Any]:
    """``spec_kind`` is ``"te"`` (identity) or ``"local"``.

    >>> checkpoint_to_model({"decoder.layers.0.mlp.linear_fc1.layer_norm_weight": 1}, "local")
    {'decoder.layers.0.pre_mlp_layernorm.weight': 1}
    """
    if spec_kind == "te":
        return dict(state)
    return {_rename(k, _LOCAL_RENAMES): v for k, v in state.items()}


def model_to_checkpoint(state: dict[str, Any], spec_kind: str) -> dict[str, Any]:
    """Inverse of :func:`checkpoint_to_model`; drops empty ``_extra_state`` entries."""
    state = {k: v for k, v in state.items() if not (k.endswith("._extra_state") and v is None)}
    if spec_kind == "te":
        return state
    inverse = tuple((dst, src) for src, dst in _LOCAL_RENAMES)
    return {_rename(k, inverse): v for k, v in state.items()}
