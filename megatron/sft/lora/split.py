"""LoRA adapters between Megatron's per-TP-rank shards and the layout-free HF PEFT form (pure).

A Megatron adapter sits on one fused linear (``linear_qkv``, ``linear_fc1``) or a plain one
(``linear_proj``, ``linear_fc2``) and is split over TP like its base weight (see
:mod:`megatron.sft.lora.adapters`): a column-parallel base's ``B`` is split exactly as the base
weight's rows are, a row-parallel base's ``A`` exactly as its columns. So the architecture's own
weight rule for the base weight does the adapter's math too, and names the HF modules: nothing
here repeats an architecture table. Export goes shards -> PEFT (:func:`adapter_to_hf`); reshard
goes shards -> PEFT -> shards at another TP (:func:`adapter_from_hf`), as the weights themselves
go through HF tensors. Worked example, ``linear_qkv`` with 4 heads / 2 KV groups, head_dim 1,
r = 1::

    PEFT   q_proj (A, Bq=[q0 q1 q2 q3])  k_proj (A, Bk=[k0 k1])  v_proj (A, Bv=[v0 v1])
    TP2    rank0 (A, B=[q0 q1 k0 v0])    rank1 (A, B=[q2 q3 k1 v1])

so ``B_rank @ A`` is exactly rank ``i``'s rows of the base's fused QKV update.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron.sft.bridge.architectures.base import ArchitectureSpec
from megatron.sft.bridge.model_shape import ModelShape
from megatron.sft.bridge.rules import ShardContext, WeightRule
from megatron.sft.lora.settings import LORA_TARGETS, PARENT

_LAYER = "decoder.layers.{i}."


@dataclasses.dataclass(frozen=True)
class TargetNames:
    """Where one LoRA target's base weight lives, in Megatron and in HF, read from the
    architecture's weight rule for it.

    Llama's ``linear_qkv``: rule ``decoder.layers.{i}.self_attention.linear_qkv.weight`` <-
    ``model.layers.{i}.self_attn.{q,k,v}_proj.weight``, so ``layer_prefix`` is
    ``model.layers.{i}.`` and ``modules`` ``("self_attn.q_proj", "self_attn.k_proj",
    "self_attn.v_proj")``.
    """

    target: str
    #: the base weight's rule: its split math is the adapter's
    rule: WeightRule
    #: HF name of a layer, with ``{i}`` for its global index
    layer_prefix: str
    #: the HF modules the target fuses, relative to the layer, in the rule's order
    modules: tuple[str, ...]

    def adapter_prefix(self, local_layer: int, local_expert: Optional[int] = None) -> str:
        """State-dict prefix of the adapter in a chunk:
        ``decoder.layers.0.mlp.linear_fc1.lora.``; a routed expert's
        ``decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.lora.``"""
        return self.rule.megatron.format(i=local_layer, e=local_expert)[: -len("weight")] \
            + "lora."

    def for_expert(self, expert: int) -> "TargetNames":
        """A routed expert's names with its global index filled in: modules
        ``mlp.experts.{e}.gate_proj`` -> ``mlp.experts.5.gate_proj``."""
        return dataclasses.replace(self, modules=tuple(m.replace("{e}", str(expert))
                                                       for m in self.modules))

    def peft_name(self, layer: int, module: str, part: str) -> str:
        """``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``"""
        return f"base_model.model.{self.layer_prefix.format(i=layer)}{module}.lora_{part}.weight"


def target_names(spec: ArchitectureSpec, target: str, shared_expert: bool = False,
                 routed_expert: bool = False) -> TargetNames:
    """The names of ``target`` (a key of ``LORA_TARGETS``) in architecture ``spec``; with
    ``shared_expert``, of the MoE shared expert's linear of that name; with ``routed_expert``,
    of a routed expert's (``{e}`` in the names: :meth:`TargetNames.for_expert`)."""
    parent = "mlp.shared_experts" if shared_expert else \
        "mlp.experts.local_experts.{e}" if routed_expert else PARENT[target]
    megatron = f"{_LAYER}{parent}.{target}.weight"
    rules = [r for r in spec.rules if r.megatron == megatron]
    if len(rules) != 1:
        raise ValueError(f"table error: {spec.hf_architecture} has {len(rules)} rules for "
                         f"{megatron}; LoRA on {target} needs exactly one")
    rule = rules[0]
    prefixes, modules = set(), []
    for hf in rule.hf:
        head, sep, tail = hf.partition("{i}.")
        if not sep or not tail.endswith(".weight"):
            raise ValueError(f"table error: {spec.hf_architecture}: {hf} (for {megatron}) is not "
                             "a per-layer weight '...{i}.<module>.weight'")
        prefixes.add(head + sep)
        modules.append(tail[: -len(".weight")])
    if len(prefixes) != 1:
        raise ValueError(f"table error: {spec.hf_architecture}: the parts of {megatron} live "
                         f"under different layers {sorted(prefixes)}")
    return TargetNames(target, rule, prefixes.pop(), tuple(modules))


def layer_target_names(spec: ArchitectureSpec, shape: ModelShape, layer: int, target: str
                       ) -> Optional[TargetNames]:
    """What ``target`` adapts on global layer ``layer``. On a Mixture-of-Experts layer the MLP
    targets (``linear_fc1``/``linear_fc2``) are its shared expert's linears, and nothing
    without a shared expert (``None``); the routed experts' are
    ``target_names(..., routed_expert=True)``, one per expert."""
    if PARENT[target] == "mlp" and shape.flag("moe_layer", layer):
        if not shape.flag("shared_expert_layer", layer):
            return None
        return target_names(spec, target, shared_expert=True)
    return target_names(spec, target)


def hf_target_modules(spec: ArchitectureSpec, targets: tuple[str, ...],
                      shape: Optional[ModelShape] = None) -> list[str]:
    """PEFT's ``target_modules`` for these targets: the HF module names
    (``["down_proj", "q_proj", ...]``), over every layer of ``shape`` when given (a MoE layer's
    MLP targets are its shared expert's)."""
    if shape is None:
        names = [target_names(spec, t) for t in targets]
    else:
        names = [n for t in targets for layer in range(shape.num_layers)
                 if (n := layer_target_names(spec, shape, layer, t)) is not None]
    return sorted({m.split(".")[-1] for n in names for m in n.modules})


def peft_targets(spec: ArchitectureSpec, targets: tuple[str, ...], shape: ModelShape
                 ) -> tuple[list[str], list[str]]:
    """``(target_modules, target_parameters)`` of the PEFT config for these targets.

    A dense model's adapters are all ``target_modules`` (``["down_proj", "q_proj", ...]``).
    On a Mixture-of-Experts model the MLP linears (a dense layer's ``mlp.gate_proj``, the
    shared expert's ``mlp.shared_expert.down_proj``) are named as ``target_parameters``
    instead (``"mlp.gate_proj.weight"``): peft 0.21 on transformers 5 rewrites Qwen3-MoE's
    ``gate_proj``/``up_proj``/``down_proj`` (Mixtral's ``w1``/``w3``/``w2``) target *modules*
    into the fused expert parameters, so as modules they would silently stay at the base
    weights (Qwen2-MoE is not rewritten today; parameters work for every family). A parameter target on a ``Linear`` is peft's ``ParamWrapper``
    with the same ``lora_A [r, in]`` / ``lora_B [out, r]`` under the same key names.
    """
    if shape.moe is None:
        return hf_target_modules(spec, targets, shape), []
    modules, parameters = set(), set()
    for t in targets:
        for layer in range(shape.num_layers):
            n = layer_target_names(spec, shape, layer, t)
            if n is None:
                continue
            if PARENT[t] == "mlp":
                parameters.update(f"{m}.weight" for m in n.modules)
            else:
                modules.update(m.split(".")[-1] for m in n.modules)
    return sorted(modules), sorted(parameters)


def _ctx(shape: ModelShape, tp: int) -> ShardContext:
    return ShardContext(shape, tp, padded_vocab_size=0)  # adapters never touch the vocabulary


def adapter_to_hf(names: TargetNames, a_shards: list[torch.Tensor],
                  b_shards: list[torch.Tensor], shape: ModelShape
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """TP shards of one Megatron adapter -> ``{hf_module: (lora_A, lora_B)}``.

    Column (``linear_qkv`` with 4 heads / 2 groups, head_dim 1, TP2): B rows
    ``[q0 q1 k0 v0 | q2 q3 k1 v1]`` -> q ``[q0..q3]``, k ``[k0 k1]``, v ``[v0 v1]``, all with
    the same (replicated) A.
    """
    ctx = _ctx(shape, len(a_shards))
    if LORA_TARGETS[names.target] == "row":
        (a,) = names.rule.to_hf(a_shards, ctx)
        return {names.modules[0]: (a, b_shards[0])}
    parts = names.rule.to_hf(b_shards, ctx)
    return {m: (a_shards[0], b) for m, b in zip(names.modules, parts)}


def adapter_from_hf(names: TargetNames, hf: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    shape: ModelShape, tp: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inverse of :func:`adapter_to_hf`: ``{hf_module: (lora_A, lora_B)}`` of one Megatron
    target -> its ``(A shards, B shards)`` for TP size ``tp``, split like the base weight.

    Column (``linear_qkv`` with 4 heads / 2 groups, head_dim 1, TP2): q ``[q0..q3]``, k
    ``[k0 k1]``, v ``[v0 v1]`` -> B rows ``[q0 q1 k0 v0 | q2 q3 k1 v1]`` (as ``FusedQKV``: the
    fused rows split evenly, so TP4 gives ``[q0 q1] [k0 v0] [q2 q3] [k1 v1]`` when TP exceeds
    the KV heads), A replicated. ``linear_fc1``: rank i gets ``[gate_i; up_i]``. Row
    (``linear_proj``, ``linear_fc2``): A split by input columns, B replicated.
    """
    modules, target = names.modules, names.target
    if set(hf) != set(modules):
        raise ValueError(f"{target} adapter needs HF modules {list(modules)}, got {sorted(hf)}")
    ctx = _ctx(shape, tp)
    if LORA_TARGETS[target] == "row":
        a, b = hf[modules[0]]
        return names.rule.to_megatron((a,), ctx), [b] * tp
    a = hf[modules[0]][0]
    for m in modules[1:]:
        if not torch.equal(hf[m][0], a):
            raise ValueError(
                f"{target}: lora_A of {m} differs from that of {modules[0]}; Megatron's fused "
                f"{target} has one A for all of {', '.join(modules)}, so only adapters whose "
                "parts share lora_A (as Megatron-SFT exports them) can be loaded")
    b_shards = names.rule.to_megatron(tuple(hf[m][1] for m in modules), ctx)
    return [a] * tp, list(b_shards)
