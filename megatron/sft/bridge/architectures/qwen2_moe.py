"""Qwen2MoeForCausalLM (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases)
with softmax top-k routed experts whose probabilities are *not* renormalised
(``norm_topk_prob=false``), plus an always-on shared expert scaled by
``sigmoid(x . shared_expert_gate)``."""

from megatron.sft.bridge.architectures._moe import (
    MoEConfigKeys,
    expert_names,
    SharedExpert,
    fused_layout,
    moe_rules,
    moe_settings,
)
from megatron.sft.bridge.architectures.base import ArchitectureSpec, register
from megatron.sft.bridge.architectures.llama import DENSE_DECODER_RULES

_H = "model.layers.{i}.mlp."
_EXPERT = expert_names(_H)

QWEN2_MOE = register(ArchitectureSpec(
    hf_architecture="Qwen2MoeForCausalLM",
    hf_config_class="Qwen2MoeConfig",
    rules=moe_rules(DENSE_DECODER_RULES, router=_H + "gate.weight", **_EXPERT,
                    shared=SharedExpert(gate_proj=_H + "shared_expert.gate_proj.weight",
                                        up_proj=_H + "shared_expert.up_proj.weight",
                                        down_proj=_H + "shared_expert.down_proj.weight",
                                        gate=_H + "shared_expert_gate.weight")),
    fused_experts=fused_layout(gate_up_proj=_H + "experts.gate_up_proj",
                               down_proj=_H + "experts.down_proj", **_EXPERT),
    moe=MoEConfigKeys(num_experts="num_experts", ffn="moe_intermediate_size",
                      renormalize="norm_topk_prob", shared_ffn="shared_expert_intermediate_size",
                      shared_expert_gate=True),
    configure=moe_settings,
    qkv_bias=True,
    # MoE on every other layer (decoder_sparse_step 2), a gated shared expert, top-2 without
    # renormalisation, q/k/v biases, tied embeddings, a vocabulary Megatron pads.
    tiny_config=dict(
        vocab_size=301, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
        decoder_sparse_step=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
        tie_word_embeddings=True, rope_theta=1000000.0, router_aux_loss_coef=0.001,
    ),
))
