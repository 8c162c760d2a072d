"""Routed experts' adapters in the form peft applies to transformers 5's fused expert
parameters (pure).

transformers 5 holds a MoE layer's experts as 3-D parameters of one module
(``mlp.experts.gate_up_proj [E, 2F, H]``, ``mlp.experts.down_proj [E, H, F]``), and peft 0.21
adapts a parameter named in ``target_parameters`` with a ``ParamWrapper`` whose
``lora_A.weight`` is ``[E*r, in]`` and ``lora_B.weight`` ``[out, r*E]``, expert ``e`` being::

    A_e = lora_A[e*r:(e+1)*r, :]            (rows, expert-major)
    B_e = lora_B[:, e::E]                   (columns j*E + e, rank-major)
    W_e += (alpha / r) * B_e @ A_e          (in, out as the expert's own [out, in] weight)

Megatron's expert ``e`` has one ``linear_fc1`` adapter for the fused ``[gate; up]`` rows (one A,
B rows gate first), so its fused form is exactly ``A_e`` and ``B_e = [B_gate; B_up]``, the parts
in the order the architecture's :class:`~megatron.sft.bridge.expert_layout.FusedExperts`
stacks them. Two targeted parameters of one module are nested wrappers, in the module's
parameter order with the first innermost: its keys go through ``base_layer`` once::

    base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight   (gate_up_proj)
    base_model.model.model.layers.1.mlp.experts.lora_A.weight              (down_proj)

(checked against peft itself by ``tests/integration/moe/test_moe_lora_export.py``).
"""

from __future__ import annotations

import torch

from megatron.sft.bridge.expert_layout import FusedExpertLayout


class ExpertsNotExpressible(ValueError):
    """Routed-expert adapters that have no PEFT form here; the message says why."""


def _fused_of(layout: FusedExpertLayout, part: str):
    for index, fused in enumerate(layout.tensors):
        if part in fused.parts:
            return index, fused
    raise ExpertsNotExpressible(f"{part} is in no fused expert tensor of the architecture's "
                                "table, so peft's fused form has no place for its adapter")


def fused_expert_tensors(layout: "FusedExpertLayout | None", layer: int,
                         experts: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]
                         ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``experts``: ``{global expert: {per-expert HF weight name as the table spells it
    (``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``): (lora_A, lora_B)}}`` of one layer, every expert present -> the PEFT tensors (keys as in the
    module docstring) and ``target_parameters`` entries relative to the layer
    (``mlp.experts.gate_up_proj``).

    Raises :class:`ExpertsNotExpressible` when the architecture has no fused layout, an
    adapted part has no fused tensor, or the parts of one fused tensor do not share ``lora_A``
    or are not all adapted.
    """
    if layout is None:
        raise ExpertsNotExpressible("the architecture declares no fused expert layout "
                                    "(transformers' in-memory form), which peft adapts")
    count = len(experts)
    if sorted(experts) != list(range(count)):
        raise ExpertsNotExpressible(f"layer {layer}: adapters of experts {sorted(experts)}, "
                                    f"not all of 0..{count - 1}")
    # (fused index) -> per expert: the parts' (A, B) in the fused tensor's order
    grouped: dict[int, list[list[tuple[torch.Tensor, torch.Tensor]]]] = {}
    for e in range(count):
        parts: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for name, ab in experts[e].items():
            index, _ = _fused_of(layout, name)
            parts.setdefault(index, {})[name] = ab
        for index, got in parts.items():
            fused = layout.tensors[index]
            missing = [p for p in fused.parts if p not in got]
            if missing:
                raise ExpertsNotExpressible(f"{fused.fused} fuses {list(fused.parts)} but only "
                                            f"{sorted(got)} carry adapters")
            a0 = got[fused.parts[0]][0]
            if any(not torch.equal(got[p][0], a0) for p in fused.parts[1:]):
                raise ExpertsNotExpressible(f"the parts of {fused.fused} have different lora_A; "
                                            "its one wrapper has one A per expert")
            grouped.setdefault(index, []).append(
                (a0, torch.cat([got[p][1] for p in fused.parts], dim=0)))
    tensors, parameters = {}, []
    targeted = sorted(grouped)
    for depth, index in enumerate(targeted):
        fused = layout.tensors[index]
        module, _, param = fused.fused.format(i=layer).rpartition(".")
        prefix = module + ".base_layer" * (len(targeted) - 1 - depth)
        a = torch.cat([ab[0] for ab in grouped[index]], dim=0)          # [E*r, in]
        b = torch.stack([ab[1] for ab in grouped[index]], dim=2)        # [out, r, E]
        tensors[f"base_model.model.{prefix}.lora_A.weight"] = a
        tensors[f"base_model.model.{prefix}.lora_B.weight"] = b.reshape(b.shape[0], -1)
        parameters.append(fused.fused.partition("{i}.")[2])
    return tensors, parameters

