"""LoRA settings (the ``--lora-*`` flags) and the names every LoRA module shares (pure).

The four targets are megatron-core's linears inside a ``TransformerLayer``; each adapter is a
child module named ``lora`` of its base linear, so adapter tensors read
``decoder.layers.0.self_attention.linear_qkv.lora.A`` whichever layer spec saved them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

#: megatron-core module name -> how its base weight is split over TP ranks
LORA_TARGETS: dict[str, Literal["column", "row"]] = {
    "linear_qkv": "column", "linear_proj": "row", "linear_fc1": "column", "linear_fc2": "row"}
#: where each target lives inside a TransformerLayer
PARENT = {"linear_qkv": "self_attention", "linear_proj": "self_attention",
          "linear_fc1": "mlp", "linear_fc2": "mlp"}
ADAPTER_MARK = ".lora."


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """``--lora-*`` flags, validated. ``scale`` is ``alpha / rank`` (peft's ``scaling``).

    >>> LoRASettings.from_flags(8, 16, 0.0, "linear_qkv, linear_fc2").targets
    ('linear_qkv', 'linear_fc2')
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(LORA_TARGETS)
    #: each routed expert of a Mixture-of-Experts layer has its own adapters on the MLP
    #: targets (``linear_fc1``/``linear_fc2``) when they are targeted; off for dense models,
    #: with ``--moe-experts-freeze``, and in runs saved before expert LoRA existed
    routed_experts: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def expert_targets(self) -> tuple[str, ...]:
        """The targets the routed experts carry adapters on (``()`` when they have none)."""
        return tuple(t for t in self.targets if PARENT[t] == "mlp") if self.routed_experts \
            else ()

    @classmethod
    def from_flags(cls, rank: int, alpha: float, dropout: float, targets: "str | tuple[str, ...]",
                   routed_experts: bool = False) -> "LoRASettings":
        if rank <= 0:
            raise ValueError(f"--lora-rank {rank}: use a positive rank (or 0 for full "
                             "fine-tuning without adapters)")
        if alpha <= 0:
            raise ValueError(f"--lora-alpha {alpha}: must be positive (the update is scaled by "
                             "alpha / rank)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"--lora-dropout {dropout}: must be in [0, 1)")
        names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) \
            else list(targets)
        names = [t for t in names if t]
        unknown = [t for t in names if t not in LORA_TARGETS]
        if unknown or not names:
            raise ValueError(f"--lora-target-modules {','.join(names) or '(empty)'}: unknown "
                             f"{unknown or 'none given'}; use a comma-separated subset of "
                             f"{','.join(LORA_TARGETS)}")
        ordered = tuple(t for t in LORA_TARGETS if t in names)  # one canonical order
        return cls(int(rank), float(alpha), float(dropout), ordered, bool(routed_experts))

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": list(self.targets), "routed_experts": self.routed_experts}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoRASettings":
        return cls.from_flags(d["rank"], d["alpha"], d.get("dropout", 0.0), tuple(d["targets"]),
                              d.get("routed_experts", False))

    def same_shape(self, other: "LoRASettings") -> bool:
        """Adapters of ``other`` load into these (dropout may change on resume)."""
        return (self.rank, self.alpha, self.targets, self.expert_targets) == \
            (other.rank, other.alpha, other.targets, other.expert_targets)



def is_adapter_name(name: str) -> bool:
    return ADAPTER_MARK in f".{name}"


def adapter_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Only the adapter tensors of a chunk's state dict (what a LoRA run's checkpoint holds)."""
    return {k: v for k, v in state.items() if is_adapter_name(k)}
