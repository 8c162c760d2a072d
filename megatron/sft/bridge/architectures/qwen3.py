"""Qwen3ForCausalLM: llama layout plus per-head RMSNorm on queries and keys (no q/k/v bias)."""

from megatron.sft.bridge.architectures.base import ArchitectureSpec, register
from megatron.sft.bridge.architectures.llama import DENSE_DECODER_RULES
from megatron.sft.bridge.rules import Replicated

_L = "decoder.layers.{i}."
_H = "model.layers.{i}."

#: the dense decoder plus q/k norms (also Qwen3-MoE's attention)
QWEN3_RULES = DENSE_DECODER_RULES + (
    Replicated(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",),
               (("head_dim",),)),
    Replicated(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",),
               (("head_dim",),)),
)

QWEN3 = register(ArchitectureSpec(
    hf_architecture="Qwen3ForCausalLM",
    hf_config_class="Qwen3Config",
    rules=QWEN3_RULES,
    qkv_bias="attention_bias",
    qk_layernorm=True,
    # q/k norms, an explicit head_dim (24) that differs from hidden/heads (16).
    tiny_config=dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, head_dim=24, max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=1000000.0,
    ),
))
