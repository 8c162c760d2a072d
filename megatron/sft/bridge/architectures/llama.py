"""LlamaForCausalLM (Llama 2, 3, 3.1, 3.2): the dense pre-norm SwiGLU/GQA/RoPE decoder.

Megatron names follow the Transformer Engine layer spec (norms fused into the following linear as
``layer_norm_weight``), which is what Megatron-LM checkpoints on GPU use; the model builder maps
them for megatron-core's local spec.
"""

from megatron.sft.bridge.architectures.base import ArchitectureSpec
from megatron.sft.bridge.rules import (
    FusedGateUp,
    FusedQKV,
    Replicated,
    TensorParallel,
    VocabParallel,
)

_L = "decoder.layers.{i}."
_H = "model.layers.{i}."
_N = (("hidden",),)  # a norm weight
_VH = (("vocab", "hidden"),)

#: Shared by every llama-shaped decoder in this package.
DENSE_DECODER_RULES = (
    VocabParallel("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), _VH),
    Replicated(_L + "self_attention.linear_qkv.layer_norm_weight", (_H + "input_layernorm.weight",), _N),
    FusedQKV(
        _L + "self_attention.linear_qkv.weight",
        (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
        (("q", "hidden"), ("kv", "hidden"), ("kv", "hidden")),
    ),
    FusedQKV(
        _L + "self_attention.linear_qkv.bias",
        (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
        (("q",), ("kv",), ("kv",)),
        when="qkv_bias",
    ),
    TensorParallel(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",),
                   (("hidden", "q"),), dim=1),
    Replicated(_L + "mlp.linear_fc1.layer_norm_weight", (_H + "post_attention_layernorm.weight",), _N),
    FusedGateUp(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
                (("ffn", "hidden"), ("ffn", "hidden"))),
    TensorParallel(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), (("hidden", "ffn"),),
                   dim=1),
    Replicated("decoder.final_layernorm.weight", ("model.norm.weight",), _N),
    VocabParallel("output_layer.weight", ("lm_head.weight",), _VH, when="untied"),
)

LLAMA = ArchitectureSpec(
    hf_architecture="LlamaForCausalLM",
    rules=DENSE_DECODER_RULES,
    qkv_bias="attention_bias",
)
