"""Qwen3MoeForCausalLM (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (q/k RMSNorm,
explicit ``head_dim``) with softmax top-k routed experts and no shared expert. ``norm_topk_prob``
renormalises the top-k probabilities (true in the released checkpoints; transformers' config
default is false); ``decoder_sparse_step`` / ``mlp_only_layers`` keep some layers dense."""

from megatron.sft.bridge.architectures._moe import (
    MoEConfigKeys,
    expert_names,
    fused_layout,
    moe_rules,
    moe_settings,
)
from megatron.sft.bridge.architectures.base import ArchitectureSpec, register
from megatron.sft.bridge.architectures.qwen3 import QWEN3_RULES

_H = "model.layers.{i}.mlp."
_EXPERT = expert_names(_H)

QWEN3_MOE = register(ArchitectureSpec(
    hf_architecture="Qwen3MoeForCausalLM",
    hf_config_class="Qwen3MoeConfig",
    rules=moe_rules(QWEN3_RULES, router=_H + "gate.weight", **_EXPERT),
    fused_experts=fused_layout(gate_up_proj=_H + "experts.gate_up_proj",
                               down_proj=_H + "experts.down_proj", **_EXPERT),
    moe=MoEConfigKeys(num_experts=("num_experts", "num_local_experts"), ffn="moe_intermediate_size",
                      renormalize="norm_topk_prob"),
    configure=moe_settings,
    qkv_bias="attention_bias",
    qk_layernorm=True,
    # 8 experts over 3 MoE layers and one dense one (mlp_only_layers), renormalised top-2, an
    # explicit head_dim (16) != hidden/heads (8), GQA, untied embeddings.
    tiny_config=dict(
        vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
        max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=1000000.0, router_aux_loss_coef=0.001,
    ),
))
