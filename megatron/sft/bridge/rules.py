"""Weight-mapping rules: one Megatron tensor <-> one or more HF tensors, with the TP math.

A rule is data (names + a kind); the kinds below are the only places that know how a tensor is
fused and split. Names use ``{i}`` for the layer index: global in HF names, stage-local in
Megatron names (Megatron stores each pipeline stage's layers from 0); and ``{e}`` for an
expert index: global in HF names, local to the expert-parallel rank in Megatron names (each EP
rank stores its experts from 0). ``stage_mapping`` expands both. Example, 4 experts, EP 2, the
second EP rank, layer 3 held as stage-local layer 1::

    decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight  (i=1, e=0 and 1)
    model.layers.{i}.mlp.experts.{e}.down_proj.weight                   (i=3, e=2 and 3)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron.sft.bridge import transforms as T
from megatron.sft.bridge.model_shape import ModelShape


@dataclasses.dataclass(frozen=True)
class ShardContext:
    shape: ModelShape
    tp_size: int
    padded_vocab_size: int
    #: tensor parallelism inside experts (megatron-core's expert_tensor_parallel_size;
    #: ``None``: ``tp_size``)
    expert_tp_size: Optional[int] = None

    def for_rule(self, rule: "WeightRule") -> "ShardContext":
        """The context ``rule`` shards in: a routed expert's tensors over expert TP (one shard,
        the whole tensor, with expert TP 1), everything else over TP."""
        if rule.per_expert and self.expert_tp_size not in (None, self.tp_size):
            return dataclasses.replace(self, tp_size=self.expert_tp_size)
        return self


@dataclasses.dataclass(frozen=True)
class WeightRule:
    megatron: str
    hf: tuple[str, ...]
    #: symbolic HF shape of each ``hf`` tensor, resolved by ``ModelShape.dim`` (e.g.
    #: ``("kv", "hidden")`` for ``k_proj.weight``); checked before anything is converted
    dims: tuple[tuple[str, ...], ...] = ()
    #: ``ModelShape.flag`` name; the rule applies only when it is true (per layer for
    #: ``moe_layer`` / ``dense_layer``).
    when: Optional[str] = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.megatron

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.megatron

    @property
    def stage(self) -> str:
        """Which pipeline stage owns a non-layer tensor: ``first``, ``last`` or ``layer``."""
        if self.per_layer:
            return "layer"
        return "first" if self.megatron.startswith("embedding.") else "last"

    def applies(self, shape: ModelShape, layer: Optional[int] = None) -> bool:
        """Whether the rule maps a tensor of ``shape`` (of global ``layer``, for per-layer
        conditions; without a layer those may apply to some layer)."""
        if self.when is None:
            return True
        if self.when in shape.LAYER_FLAGS:
            return layer is None or shape.flag(self.when, layer)
        return shape.flag(self.when)

    def hf_shapes(self, shape: ModelShape) -> tuple[tuple[int, ...], ...]:
        if len(self.dims) != len(self.hf):
            raise ValueError(f"table error: {self.megatron} declares {len(self.dims)} shapes "
                             f"for {len(self.hf)} HF tensors")
        return tuple(tuple(shape.dim(d) for d in dims) for dims in self.dims)

    def to_megatron(self, hf: tuple[torch.Tensor, ...], ctx: ShardContext) -> list[torch.Tensor]:
        raise NotImplementedError

    def to_hf(self, shards: list[torch.Tensor], ctx: ShardContext) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Replicated(WeightRule):
    """Same tensor on every TP rank (norms)."""

    def to_megatron(self, hf, ctx):
        return [hf[0]] * ctx.tp_size

    def to_hf(self, shards, ctx):
        return (shards[0],)


@dataclasses.dataclass(frozen=True)
class TensorParallel(WeightRule):
    """Split along ``dim``: 0 for column-parallel outputs, 1 for row-parallel inputs."""

    dim: int = 0

    def to_megatron(self, hf, ctx):
        return T.split_tp(hf[0], ctx.tp_size, self.dim)

    def to_hf(self, shards, ctx):
        return (T.merge_tp(shards, self.dim),)


@dataclasses.dataclass(frozen=True)
class VocabParallel(WeightRule):
    """Embedding / output layer: padded to the Megatron vocab size, then split by rows."""

    def to_megatron(self, hf, ctx):
        if hf[0].shape[0] != ctx.shape.vocab_size:
            raise ValueError(
                f"{self.hf[0]} has {hf[0].shape[0]} rows but vocab_size is {ctx.shape.vocab_size}"
            )
        return T.split_tp(T.pad_vocab(hf[0], ctx.padded_vocab_size), ctx.tp_size, 0)

    def to_hf(self, shards, ctx):
        return (T.merge_tp(shards, 0)[: ctx.shape.vocab_size].contiguous(),)


@dataclasses.dataclass(frozen=True)
class FusedQKV(WeightRule):
    """``hf = (q, k, v)`` -> Megatron ``linear_qkv`` (weight or bias)."""

    def to_megatron(self, hf, ctx):
        s = ctx.shape
        q, k, v = hf
        expected = (s.num_attention_heads * s.head_dim, s.num_query_groups * s.head_dim)
        if q.shape[0] != expected[0] or k.shape[0] != expected[1] or v.shape[0] != expected[1]:
            raise ValueError(
                f"q/k/v rows {q.shape[0]}/{k.shape[0]}/{v.shape[0]} do not match "
                f"{s.num_attention_heads} heads, {s.num_query_groups} KV heads, head_dim {s.head_dim}"
            )
        return T.split_tp(T.fuse_qkv(q, k, v, s.num_query_groups), ctx.tp_size, 0)

    def to_hf(self, shards, ctx):
        s = ctx.shape
        return T.unfuse_qkv(
            T.merge_tp(shards, 0), s.num_attention_heads, s.num_query_groups, s.head_dim
        )


@dataclasses.dataclass(frozen=True)
class FusedGateUp(WeightRule):
    """``hf = (gate, up)`` -> Megatron gated ``linear_fc1``."""

    def to_megatron(self, hf, ctx):
        return T.fuse_gate_up(hf[0], hf[1], ctx.tp_size)

    def to_hf(self, shards, ctx):
        return T.unfuse_gate_up(shards)


# --- Named constructors -----------------------------------------------------------------------
# The fused rules take their HF tensors in a fixed order that the math depends on ((q, k, v),
# (gate, up)). Naming the parts at the call site makes a swapped pair visible in review instead
# of only in a logits test.


def _fused_dims(megatron: str, weight: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
    """HF dims of a fused rule's parts: ``weight`` for ``*.weight``, their first axis for
    ``*.bias`` (``(("q", "hidden"),)`` -> ``(("q",),)``)."""
    if megatron.endswith(".weight"):
        return weight
    if megatron.endswith(".bias"):
        return tuple(d[:1] for d in weight)
    raise ValueError(f"table error: fused tensor {megatron!r} is neither a .weight nor a .bias; "
                     f"pass the HF shapes explicitly with FusedQKV/FusedGateUp")


def qkv(megatron: str, *, q: str, k: str, v: str, when: Optional[str] = None) -> FusedQKV:
    """Megatron ``linear_qkv`` weight or bias from separate HF q/k/v projections.

    ``qkv("decoder.layers.{i}.self_attention.linear_qkv.bias", q="…q_proj.bias",
    k="…k_proj.bias", v="…v_proj.bias", when="qkv_bias")`` is
    ``FusedQKV(<same name>, (q, k, v), (("q",), ("kv",), ("kv",)), when="qkv_bias")``.
    """
    dims = _fused_dims(megatron, (("q", "hidden"), ("kv", "hidden"), ("kv", "hidden")))
    return FusedQKV(megatron, (q, k, v), dims, when=when)


def gate_up(megatron: str, *, gate: str, up: str, when: Optional[str] = None,
            ffn: str = "ffn") -> FusedGateUp:
    """Megatron gated ``linear_fc1`` from HF ``gate_proj`` and ``up_proj`` (SwiGLU: the gate is
    the half that goes through the activation). Shapes: ``((ffn, "hidden"),) * 2`` for a weight,
    ``ffn`` naming the intermediate size (``"expert_ffn"`` for a routed expert).
    """
    dims = _fused_dims(megatron, ((ffn, "hidden"), (ffn, "hidden")))
    return FusedGateUp(megatron, (gate, up), dims, when=when)
