"""One pipeline chunk's decoder as megatron-core's ``TransformerBlockSubmodules``: a layer spec
per layer (dense MLP or MoE block) and the final norm, when one shared layer spec is not enough.

Two cases need it:

- **Mixture-of-Experts models with dense layers** (Qwen3-MoE's ``mlp_only_layers``, Qwen2-MoE's
  ``decoder_sparse_step``): each layer of the chunk gets the dense or the MoE layer spec, by
  its global index (megatron-core's own ``get_gpt_decoder_block_spec`` reads a pattern from the
  config instead; here it comes from the checkpoint's ``MoEShape``, and the attention backend
  and experts implementation of :class:`~megatron.sft.runtime.layer_impl.LayerImpl` apply to
  every layer).
- **Sequence parallelism with megatron-core's local (torch) norms**, which assert it off:
  :class:`SequenceParallelTorchNorm` is the same ``torch.nn.RMSNorm`` / ``LayerNorm``, with its
  weights marked ``sequence_parallel`` so ``finalize_model_grads`` sums their gradients over the
  TP ranks, each of which normalised a different slice of the sequence. megatron-core's MoE layer
  refuses to *train* with TP > 1 without sequence parallelism (each TP rank would send the same
  tokens to the experts, and the experts' gradients would count every token TP times), so MoE
  with TP needs this on CPU.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch


class SequenceParallelTorchNorm:
    """megatron-core's ``WrappedTorchNorm`` with sequence parallelism allowed: a plain
    ``torch.nn.RMSNorm`` (or ``LayerNorm``) whose parameters carry ``sequence_parallel``."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization: str = "LayerNorm"):
        kinds = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        if config.normalization not in kinds or config.layernorm_zero_centered_gamma:
            raise ValueError(f"sequence-parallel torch norm: normalization "
                             f"{config.normalization!r} (zero-centered gamma "
                             f"{config.layernorm_zero_centered_gamma}) is not supported")
        norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)
        return norm


def _is_torch_norm(module: Any) -> bool:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return module is WrappedTorchNorm


def allow_sequence_parallel(layer_spec) -> None:
    """Replace the torch norms of a layer spec (in place) by :class:`SequenceParallelTorchNorm`."""
    sub = layer_spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if _is_torch_norm(getattr(sub, name, None)):
            setattr(sub, name, SequenceParallelTorchNorm)
    attention = getattr(getattr(sub, "self_attention", None), "submodules", None)
    for name in ("q_layernorm", "k_layernorm"):
        if attention is not None and _is_torch_norm(getattr(attention, name, None)):
            setattr(attention, name, SequenceParallelTorchNorm)


def decoder_block_spec(impl, *, qk_layernorm: bool, sliding_window: Optional[int],
                       moe_layers: Sequence[bool], spec_args: dict[str, Any],
                       sequence_parallel: bool = False):
    """``TransformerBlockSubmodules`` for a chunk whose layers are MoE where ``moe_layers`` is
    true; ``spec_args`` are the architecture's layer-spec arguments (``num_experts``... apply to
    MoE layers only)."""
    from megatron.core.transformer import transformer_block as tb

    dense_args = {k: v for k, v in spec_args.items() if k != "num_experts"}
    specs: dict[bool, Any] = {}
    for moe in set(moe_layers):
        spec = impl.layer_spec(qk_layernorm, sliding_window, **(spec_args if moe else dense_args))
        if sequence_parallel:
            allow_sequence_parallel(spec)
        specs[moe] = spec
    final_norm = tb.LayerNormImpl
    if sequence_parallel and _is_torch_norm(final_norm):
        final_norm = SequenceParallelTorchNorm
    return tb.TransformerBlockSubmodules(layer_specs=[specs[m] for m in moe_layers],
                                         layer_norm=final_norm)
