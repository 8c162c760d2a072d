"""DeepseekV3ForCausalLM: DeepSeek-V3/V3.1/R1 (671B), Kimi-K2, Moonlight-16B-A3B. Multi-latent
attention with a q latent, YaRN RoPE, sigmoid routing with a selection bias
(``e_score_correction_bias`` -> megatron-core's ``expert_bias``, kept in fp32), group-limited
top-k, a shared expert, dense first layers; see ``_deepseek`` for the mapping and the routing.
The release's multi-token-prediction layer (``model.layers.61.*``, ``num_nextn_predict_layers``)
is not converted and export puts it back unchanged from the HF reference. Read without
``trust_remote_code``: transformers has the class. DeepSeek-V3.2 (``DeepseekV32ForCausalLM``,
sparse attention) is refused by name (``architectures.REFUSED``)."""

from megatron.sft.bridge.architectures._deepseek import (
    DEEPSEEK_RULES,
    EXPERT_BIAS_RULE,
    FUSED_EXPERTS,
    deepseek_settings,
    read_mla,
    read_moe,
)
from megatron.sft.bridge.architectures.base import ArchitectureSpec, register

DEEPSEEK_V3 = register(ArchitectureSpec(
    hf_architecture="DeepseekV3ForCausalLM",
    hf_config_class="DeepseekV3Config",
    rules=DEEPSEEK_RULES + (EXPERT_BIAS_RULE,),
    fused_experts=FUSED_EXPERTS,
    mla=lambda cfg: read_mla(cfg, interleave_key="rope_interleave"),
    moe=lambda cfg: read_moe(cfg, sigmoid=True),
    configure=deepseek_settings,
    keep_fp32=("*.e_score_correction_bias", "*.router.expert_bias"),
    # q latent 32, kv latent 32, q/k head 16 + 8 rope != v head 12, YaRN with both mscales
    # (softmax scale and cos/sin factor), 8 experts in 2 groups (top-1 group, top-2 experts),
    # routed_scaling_factor 2.5, a shared expert, one dense first layer, untied embeddings.
    tiny_config=dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        first_k_dense_replace=1, max_position_embeddings=1024, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_interleave=True, num_nextn_predict_layers=0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 256, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.7},
    ),
))
