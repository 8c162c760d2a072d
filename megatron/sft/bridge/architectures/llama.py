"""LlamaForCausalLM (Llama 2, 3, 3.1, 3.2): the dense pre-norm SwiGLU/GQA/RoPE decoder.

Megatron names follow the Transformer Engine layer spec (norms fused into the following linear as
``layer_norm_weight``), which is what Megatron-LM checkpoints on GPU use; the model builder maps
them for megatron-core's local spec.
"""

from megatron.sft.bridge.architectures.base import ArchitectureSpec, register
from megatron.sft.bridge.rules import (
    Replicated,
    TensorParallel,
    VocabParallel,
    gate_up,
    qkv,
)

_L = "decoder.layers.{i}."
_H = "model.layers.{i}."
_N = (("hidden",),)  # a norm weight
_VH = (("vocab", "hidden"),)

#: Shared by every llama-shaped decoder in this package.
DENSE_DECODER_RULES = (
    VocabParallel("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), _VH),
    Replicated(_L + "self_attention.linear_qkv.layer_norm_weight", (_H + "input_layernorm.weight",), _N),
    qkv(_L + "self_attention.linear_qkv.weight",
        q=_H + "self_attn.q_proj.weight", k=_H + "self_attn.k_proj.weight",
        v=_H + "self_attn.v_proj.weight"),
    qkv(_L + "self_attention.linear_qkv.bias",
        q=_H + "self_attn.q_proj.bias", k=_H + "self_attn.k_proj.bias",
        v=_H + "self_attn.v_proj.bias", when="qkv_bias"),
    TensorParallel(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",),
                   (("hidden", "q"),), dim=1),
    Replicated(_L + "mlp.linear_fc1.layer_norm_weight", (_H + "post_attention_layernorm.weight",), _N),
    gate_up(_L + "mlp.linear_fc1.weight",
            gate=_H + "mlp.gate_proj.weight", up=_H + "mlp.up_proj.weight"),
    TensorParallel(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), (("hidden", "ffn"),),
                   dim=1),
    Replicated("decoder.final_layernorm.weight", ("model.norm.weight",), _N),
    VocabParallel("output_layer.weight", ("lm_head.weight",), _VH, when="untied"),
)

LLAMA = register(ArchitectureSpec(
    hf_architecture="LlamaForCausalLM",
    hf_config_class="LlamaConfig",
    rules=DENSE_DECODER_RULES,
    qkv_bias="attention_bias",
    # GQA, untied embeddings, Llama 3.1-style rope scaling, a vocabulary Megatron pads.
    tiny_config=dict(
        vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
))
