"""What one architecture table declares."""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

from megatron.sft.bridge.model_shape import ModelShape, shape_from_hf_config
from megatron.sft.bridge.rules import WeightRule


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
    hf_architecture: str
    rules: tuple[WeightRule, ...]
    #: constant, or the config.json key holding whether q/k/v projections have a bias
    qkv_bias: "bool | str" = False
    qk_layernorm: bool = False
    #: HF tensors that carry no weights (buffers older checkpoints saved); never an error.
    ignored_hf: tuple[str, ...] = ("*.rotary_emb.inv_freq",)

    def shape(self, hf_config: dict[str, Any]) -> ModelShape:
        return shape_from_hf_config(
            hf_config,
            architecture=self.hf_architecture,
            qkv_bias=self.qkv_bias,
            qk_layernorm=self.qk_layernorm,
        )

    def active_rules(self, shape: ModelShape) -> tuple[WeightRule, ...]:
        return tuple(r for r in self.rules if r.applies(shape))

    def is_ignored(self, hf_name: str) -> bool:
        return any(fnmatch.fnmatchcase(hf_name, pattern) for pattern in self.ignored_hf)
