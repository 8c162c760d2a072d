"""Norms for megatron-core's local layer spec that work with sequence parallelism.

megatron-core 0.16's local spec builds its norms with ``WrappedTorchNorm``, which asserts
"sequence parallel not supported by torch LayerNorm" (its Apex/TE norms are the only ones it
marks for SP). Nothing in a norm's math depends on how the sequence is split: with
``--sequence-parallel`` each tensor-parallel rank normalises its own ``s / TP`` tokens with the
same (replicated) weight, so that weight's gradient on one rank covers only its tokens. Marking
the weight ``sequence_parallel = True`` is what makes megatron-core's ``finalize_model_grads``
all-reduce it over TP (``_allreduce_non_tensor_model_parallel_grads``), exactly as TE's and
Apex's norms do. These classes are ``torch.nn.RMSNorm`` / ``torch.nn.LayerNorm`` with that mark,
so parameter names, checkpoints and numbers are those of the torch norms they replace.

:meth:`LayerImpl.layer_spec` puts :class:`LocalNorm` in a local layer's ``input_layernorm`` /
``pre_mlp_layernorm`` and the block's final norm (:meth:`LayerImpl.block_spec`), and
:class:`LocalHeadNorm` in ``q_layernorm`` / ``k_layernorm``: those run on heads after
``linear_qkv`` has gathered the sequence, and megatron-core already sums their gradients over TP
(each rank holds other heads), so they are not marked.

Example::

    >>> class C: normalization = "RMSNorm"; sequence_parallel = True
    >>> norm = LocalNorm(C(), 8, eps=1e-6)
    >>> type(norm).__name__, norm.weight.sequence_parallel
    ('RMSNorm', True)
"""

from __future__ import annotations

import torch


def _torch_norm(config, hidden_size: int, eps: float, zero_centered_gamma: bool,
                normalization: str):
    if zero_centered_gamma or getattr(config, "layernorm_zero_centered_gamma", False):
        raise ValueError("zero-centred norm weights need Transformer Engine or Apex norms; "
                         "use --transformer-impl transformer_engine")
    kind = getattr(config, "normalization", normalization)
    if kind == "RMSNorm":
        return torch.nn.RMSNorm(hidden_size, eps=eps)
    if kind == "LayerNorm":
        return torch.nn.LayerNorm(hidden_size, eps=eps)
    raise ValueError(f"normalization {kind!r}: the local layer spec has RMSNorm and LayerNorm")


class LocalNorm:
    """A layer's norm on the local spec: its parameters carry ``sequence_parallel`` (the
    config's), so megatron-core reduces their gradients over TP when SP is on."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        norm = _torch_norm(config, hidden_size, eps, zero_centered_gamma, normalization)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))
        return norm


class LocalHeadNorm:
    """q/k norms on the local spec (per head, after the sequence is gathered): not marked."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        return _torch_norm(config, hidden_size, eps, zero_centered_gamma, normalization)
