"""MistralForCausalLM: llama layout; ``sliding_window`` is recorded in the shape (see
``ModelShape.sliding_window``) because megatron-core's local attention has no window."""

from megatron.sft.bridge.architectures.base import ArchitectureSpec
from megatron.sft.bridge.architectures.llama import DENSE_DECODER_RULES

MISTRAL = ArchitectureSpec(
    hf_architecture="MistralForCausalLM",
    rules=DENSE_DECODER_RULES,
    qkv_bias=False,
)
