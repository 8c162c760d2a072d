"""MixtralForCausalLM (Mixtral 8x7B, 8x22B): Mistral's attention with a softmax top-k
router whose top-k probabilities are always renormalised, on every layer. Checkpoints name the
block ``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up), ``w2`` (down); transformers
5 holds them as ``mlp.experts.gate_up_proj`` / ``down_proj`` and the router as ``mlp.gate``."""

from megatron.sft.bridge.architectures._moe import (
    MoEConfigKeys,
    expert_names,
    fused_layout,
    moe_rules,
    moe_settings,
)
from megatron.sft.bridge.architectures.base import ArchitectureSpec, register
from megatron.sft.bridge.architectures.llama import DENSE_DECODER_RULES

_H = "model.layers.{i}.block_sparse_moe."
_EXPERT = expert_names(_H, "w1", "w3", "w2")

MIXTRAL = register(ArchitectureSpec(
    hf_architecture="MixtralForCausalLM",
    hf_config_class="MixtralConfig",
    rules=moe_rules(DENSE_DECODER_RULES, router=_H + "gate.weight", **_EXPERT),
    fused_experts=fused_layout(
        gate_up_proj="model.layers.{i}.mlp.experts.gate_up_proj",
        down_proj="model.layers.{i}.mlp.experts.down_proj", **_EXPERT,
        renames=(("model.layers.{i}.mlp.gate.weight", _H + "gate.weight"),)),
    moe=MoEConfigKeys(num_experts="num_local_experts", ffn="intermediate_size",
                      renormalize=True, sparse_layers=False),
    configure=moe_settings,
    qkv_bias=False,
    # 4 experts, top-2 renormalised, GQA, untied embeddings.
    tiny_config=dict(
        vocab_size=200, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_theta=1000000.0, router_aux_loss_coef=0.02,
        sliding_window=None,
    ),
))
