"""MistralForCausalLM: llama layout; ``sliding_window`` is recorded in the shape (see
``ModelShape.sliding_window``) because megatron-core's local attention has no window."""

from megatron.sft.bridge.architectures.base import ArchitectureSpec, register
from megatron.sft.bridge.architectures.llama import DENSE_DECODER_RULES

MISTRAL = register(ArchitectureSpec(
    hf_architecture="MistralForCausalLM",
    hf_config_class="MistralConfig",
    rules=DENSE_DECODER_RULES,
    qkv_bias=False,
    # MHA, an explicit head_dim, a sliding window longer than the test sequences.
    tiny_config=dict(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=1024,
    ),
))
