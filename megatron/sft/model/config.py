"""ModelShape + layout + layer implementation -> megatron-core ``TransformerConfig`` and
``GPTModel`` arguments (model construction; the bridge only converts weights).

Reuses megatron-core's own config dataclass. The llama-shaped defaults below (RMSNorm, SwiGLU,
no linear bias) are what every supported architecture shares; an architecture that differs says
so in its table (``ArchitectureSpec.megatron_settings``), and callers pass run settings
(recompute, per-token loss, ...) through ``overrides``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from megatron.sft.bridge.model_shape import ModelShape
from megatron.sft.runtime.layout import ParallelLayout
from megatron.sft.model.layer_impl import LayerImpl


def transformer_config(shape: ModelShape, layout: ParallelLayout, impl: LayerImpl, *,
                       params_dtype: torch.dtype, cpu: bool,
                       architecture_overrides: Mapping[str, Any] = (), **overrides: Any):
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    kwargs: dict[str, Any] = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **layout.to_megatron(),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=cpu,
        sequence_parallel=False,
        # gloo matches a batch of isend/irecv to the same peer by posting order only; with PP=2
        # (previous stage == next stage) the interleaved schedule's activations and gradients
        # then land in each other's buffers. The unbatched path orders them by rank parity.
        batch_p2p_comm=not cpu,
    )
    kwargs.update(impl.config_overrides(cpu=cpu, sliding_window=shape.sliding_window))
    kwargs.update(_per_layer_attention(shape))
    kwargs.update(dict(architecture_overrides))
    kwargs.update(overrides)
    # Multi-latent attention (DeepSeek-V2/V3) reads its dims and YaRN from megatron-core's
    # MLA config class; the architecture sets ``multi_latent_attention`` and those fields.
    config_class = MLATransformerConfig if kwargs.get("multi_latent_attention") else \
        TransformerConfig
    return config_class(**kwargs)


def _per_layer_attention(shape: ModelShape) -> dict[str, Any]:
    """Per-layer windows as megatron-core spells them (``attention.core.layer_window`` reads
    them) and YaRN's score factor in the softmax scale (``model.yarn``)."""
    out: dict[str, Any] = {}
    if shape.window_layers:
        out.update(window_size=(shape.layer_window - 1, 0),
                   window_attn_skip_freq=[int(w) for w in shape.window_layers])
    if shape.rope.yarn is not None:
        from megatron.sft.model.yarn import YarnConfig

        m = YarnConfig(**dict(shape.rope.yarn)).scores_factor()
        out["softmax_scale"] = m * m / shape.head_dim ** 0.5
    return out


def gpt_model_kwargs(shape: ModelShape, padded_vocab_size: int,
                     max_sequence_length: Optional[int] = None) -> dict[str, Any]:
    seq = max_sequence_length or shape.max_position_embeddings
    return dict(
        vocab_size=padded_vocab_size,
        max_sequence_length=seq,
        position_embedding_type="rope",
        rotary_base=int(shape.rope.theta) if float(shape.rope.theta).is_integer() else shape.rope.theta,
        rope_scaling=shape.rope.llama3_factor is not None,
        rope_scaling_factor=shape.rope.llama3_factor or 8.0,
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
    )
