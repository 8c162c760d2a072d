"""Qwen2ForCausalLM (Qwen2/2.5 and DeepSeek-R1-Distill-Qwen-*): llama layout with q/k/v biases."""

from megatron.sft.bridge.architectures.base import ArchitectureSpec
from megatron.sft.bridge.architectures.llama import DENSE_DECODER_RULES

QWEN2 = ArchitectureSpec(
    hf_architecture="Qwen2ForCausalLM",
    rules=DENSE_DECODER_RULES,
    qkv_bias=True,
)
