"""DeepseekV2ForCausalLM: DeepSeek-V2 and V2-Lite. Multi-latent attention (V2-Lite without a
q latent: ``q_lora_rank`` null -> one ``q_proj``), softmax top-k routing never renormalised,
times ``routed_scaling_factor``, a shared expert, dense first layers; see ``_deepseek``."""

from megatron.sft.bridge.architectures._deepseek import (
    DEEPSEEK_RULES,
    FUSED_EXPERTS,
    deepseek_settings,
    read_mla,
    read_moe,
)
from megatron.sft.bridge.architectures.base import ArchitectureSpec, register

DEEPSEEK_V2 = register(ArchitectureSpec(
    hf_architecture="DeepseekV2ForCausalLM",
    hf_config_class="DeepseekV2Config",
    rules=DEEPSEEK_RULES,
    fused_experts=FUSED_EXPERTS,
    mla=lambda cfg: read_mla(cfg, interleave_key=None),
    moe=lambda cfg: read_moe(cfg, sigmoid=False),
    configure=deepseek_settings,
    # V2-Lite's shape: no q latent (q_proj), plain RoPE, greedy softmax top-2 of 8, scaled
    # weights, two shared experts, one dense first layer; v head 12 != q/k head 16 + 8.
    tiny_config=dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
        topk_method="greedy", routed_scaling_factor=1.5, first_k_dense_replace=1,
        max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
))
