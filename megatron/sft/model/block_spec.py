"""One pipeline chunk's decoder as megatron-core's ``TransformerBlockSubmodules``: a layer spec
per layer (dense MLP or MoE block, by global index) and the final norm.

megatron-core's own ``get_gpt_decoder_block_spec`` reads the MoE layer pattern from its config;
here it comes from the checkpoint's ``MoEShape`` (Qwen3-MoE's ``mlp_only_layers``, Qwen2-MoE's
``decoder_sparse_step``), and the attention backend, experts implementation and norms of
:class:`~megatron.sft.model.layer_impl.LayerImpl` apply to every layer. A dense model's chunk
is the same layer spec repeated. The final norm is :meth:`LayerImpl.final_norm` (ours on the
local spec, so ``--sequence-parallel`` works without Transformer Engine: see ``model.norms``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence


def decoder_block_spec(impl, *, qk_layernorm: bool, sliding_window: Optional[int],
                       moe_layers: Sequence[bool], spec_args: dict[str, Any]):
    """``TransformerBlockSubmodules`` for a chunk whose layers are MoE where ``moe_layers`` is
    true; ``spec_args`` are the architecture's layer-spec arguments (``num_experts``... apply to
    MoE layers only)."""
    from megatron.core.transformer import transformer_block as tb

    dense_args = {k: v for k, v in spec_args.items() if k != "num_experts"}
    specs: dict[bool, Any] = {}
    for moe in set(moe_layers):
        specs[moe] = impl.layer_spec(qk_layernorm, sliding_window,
                                     **(spec_args if moe else dense_args))
    return tb.TransformerBlockSubmodules(layer_specs=[specs[m] for m in moe_layers],
                                         layer_norm=impl.final_norm())
