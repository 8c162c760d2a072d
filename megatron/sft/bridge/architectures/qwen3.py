"""Qwen3ForCausalLM: llama layout plus per-head RMSNorm on queries and keys (no q/k/v bias)."""

from megatron.sft.bridge.architectures.base import ArchitectureSpec
from megatron.sft.bridge.architectures.llama import DENSE_DECODER_RULES
from megatron.sft.bridge.rules import Replicated

_L = "decoder.layers.{i}."
_H = "model.layers.{i}."

QWEN3 = ArchitectureSpec(
    hf_architecture="Qwen3ForCausalLM",
    rules=DENSE_DECODER_RULES
    + (
        Replicated(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",),
                   (("head_dim",),)),
        Replicated(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",),
                   (("head_dim",),)),
    ),
    qkv_bias="attention_bias",
    qk_layernorm=True,
)
