"""LoRA adapters between Megatron's per-TP-rank shards and the layout-free HF PEFT form (pure).

A Megatron adapter sits on one fused linear (``linear_qkv``, ``linear_fc1``) or a plain one
(``linear_proj``, ``linear_fc2``) and is split over TP like its base weight (see
``runtime/lora.py``); the PEFT form has one ``(lora_A, lora_B)`` per HF module. Export goes
shards -> PEFT (:func:`adapter_to_hf`); reshard goes shards -> PEFT -> shards at another TP
(:func:`adapter_from_hf`), as the weights themselves go through HF tensors. Worked example,
``linear_qkv`` with 4 heads / 2 KV groups, head_dim 1, r = 1::

    PEFT   q_proj (A, Bq=[q0 q1 q2 q3])  k_proj (A, Bk=[k0 k1])  v_proj (A, Bv=[v0 v1])
    TP2    rank0 (A, B=[q0 q1 k0 v0])    rank1 (A, B=[q2 q3 k1 v1])

so ``B_rank @ A`` is exactly rank ``i``'s rows of the base's fused QKV update.
"""

from __future__ import annotations

import torch

from megatron.sft.bridge import transforms as T
from megatron.sft.bridge.model_shape import ModelShape
from megatron.sft.runtime.lora import LORA_TARGETS

#: megatron-core target -> (its parent in a TransformerLayer, the HF modules it fuses)
HF_MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "linear_qkv": ("self_attention", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "linear_proj": ("self_attention", ("self_attn.o_proj",)),
    "linear_fc1": ("mlp", ("mlp.gate_proj", "mlp.up_proj")),
    "linear_fc2": ("mlp", ("mlp.down_proj",)),
}


def adapter_to_hf(target: str, a_shards: list[torch.Tensor], b_shards: list[torch.Tensor],
                  shape: ModelShape) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """TP shards of one Megatron adapter -> ``{hf_module: (lora_A, lora_B)}``.

    Column (``linear_qkv`` with 4 heads / 2 groups, head_dim 1, TP2): B rows
    ``[q0 q1 k0 v0 | q2 q3 k1 v1]`` -> q ``[q0..q3]``, k ``[k0 k1]``, v ``[v0 v1]``, all with
    the same (replicated) A.
    """
    _, modules = HF_MODULES[target]
    if LORA_TARGETS[target] == "row":
        return {modules[0]: (T.merge_tp(a_shards, 1), b_shards[0])}
    a = a_shards[0]
    if target == "linear_qkv":
        parts = T.unfuse_qkv(T.merge_tp(b_shards, 0), shape.num_attention_heads,
                             shape.num_query_groups, shape.head_dim)
    else:
        parts = T.unfuse_gate_up(b_shards)
    return {m: (a, b) for m, b in zip(modules, parts)}


def adapter_from_hf(target: str, hf: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    shape: ModelShape, tp: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inverse of :func:`adapter_to_hf`: ``{hf_module: (lora_A, lora_B)}`` of one Megatron
    target -> its ``(A shards, B shards)`` for TP size ``tp``, split like the base weight.

    Column (``linear_qkv`` with 4 heads / 2 groups, head_dim 1, TP2): q ``[q0..q3]``, k
    ``[k0 k1]``, v ``[v0 v1]`` -> B rows ``[q0 q1 k0 v0 | q2 q3 k1 v1]`` (as ``FusedQKV``: the
    fused rows split evenly, so TP4 gives ``[q0 q1] [k0 v0] [q2 q3] [k1 v1]`` when TP exceeds
    the KV heads), A replicated. ``linear_fc1``: rank i gets ``[gate_i; up_i]``. Row
    (``linear_proj``, ``linear_fc2``): A split by input columns, B replicated.
    """
    _, modules = HF_MODULES[target]
    if set(hf) != set(modules):
        raise ValueError(f"{target} adapter needs HF modules {list(modules)}, got {sorted(hf)}")
    if LORA_TARGETS[target] == "row":
        a, b = hf[modules[0]]
        return T.split_tp(a, tp, 1), [b] * tp
    a = hf[modules[0]][0]
    for m in modules[1:]:
        if not torch.equal(hf[m][0], a):
            raise ValueError(
                f"{target}: lora_A of {m} differs from that of {modules[0]}; Megatron's fused "
                f"{target} has one A for all of {', '.join(modules)}, so only adapters whose "
                "parts share lora_A (as Megatron-SFT exports them) can be loaded")
    bs = [hf[m][1] for m in modules]
    if target == "linear_qkv":
        b_shards = T.split_tp(T.fuse_qkv(*bs, shape.num_query_groups), tp, 0)
    else:
        b_shards = T.fuse_gate_up(*bs, tp)
    return [a] * tp, b_shards


def adapter_prefix(local_layer: int, target: str) -> str:
    """State-dict prefix of one adapter inside a chunk: ``decoder.layers.0.mlp.linear_fc1.lora.``"""
    return f"decoder.layers.{local_layer}.{HF_MODULES[target][0]}.{target}.lora."
