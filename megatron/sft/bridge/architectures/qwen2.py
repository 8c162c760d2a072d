"""Qwen2ForCausalLM (Qwen2/2.5 and DeepSeek-R1-Distill-Qwen-*): llama layout with q/k/v biases."""

from megatron.sft.bridge.architectures.base import ArchitectureSpec, register
from megatron.sft.bridge.architectures.llama import DENSE_DECODER_RULES

QWEN2 = register(ArchitectureSpec(
    hf_architecture="Qwen2ForCausalLM",
    hf_config_class="Qwen2Config",
    rules=DENSE_DECODER_RULES,
    qkv_bias=True,
    # GQA, tied embeddings, q/k/v biases, an odd vocabulary size.
    tiny_config=dict(
        vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0,
    ),
))
