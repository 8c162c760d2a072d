"""The base linears LoRA can wrap, as data: how each is split over tensor-parallel ranks and
whether it normalises its own input.

megatron-core 0.16 builds a GPT layer's four targets from one of two layer specs:

===============================  ======  ===========  ===============================
class                            split   norm inside  forward
===============================  ======  ===========  ===============================
ColumnParallelLinear (local)     column  no           ``forward(input_) -> (W x, b)``
RowParallelLinear (local)        row     no           ``forward(input_) -> (W x, b)``
TEColumnParallelLinear           column  no           ``forward(x) -> (W x, b)``
TERowParallelLinear              row     no           ``forward(x) -> (W x, b)``
TELayerNormColumnParallelLinear  column  yes          ``forward(x) -> (W norm(x), b)``
===============================  ======  ===========  ===============================

(``b`` is ``None`` unless the bias is returned for a later fused add.) The TE spec uses the
fused one for ``linear_qkv`` and ``linear_fc1``: its input layer norm has no module of its own,
the un-normalised hidden states go in and ``layer_norm_weight`` (plus ``layer_norm_bias`` for
LayerNorm) is applied before ``W``.

Classes are recognised by name, not ``isinstance``: without Transformer Engine (every CPU
machine) megatron-core's TE wrappers are ``MagicMock`` objects, and importing TE only to compare
types would tie this module to a GPU. Attributes are then checked, so a look-alike without them
is refused by name.

One size rule serves every row: the adapter takes this rank's ``[out, in]`` from the base
weight (column: ``[out/tp, in]``, row: ``[out, in/tp]``). The local classes' ``input_size`` /
``output_size`` are full sizes while TE's ``in_features`` / ``out_features`` are per rank; the
weight is what both agree on.

Pure: imports torch only (no process group), so the table and the norm are unit-tested alone.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch


@dataclasses.dataclass(frozen=True)
class BaseLinear:
    """What an adapter needs to know about one base linear class."""

    #: how the base weight is split over TP ranks: by output rows or by input columns
    split: Literal["column", "row"]
    #: the module applies its own layer norm before ``W`` (TE's fused norm + linear), so the
    #: adapter must apply the same norm to see what ``W`` sees
    normalises_input: bool
    #: the name of ``forward``'s input parameter, for a call by keyword
    input_arg: str
    #: a Transformer Engine module: its split is read from ``parallel_mode``
    transformer_engine: bool


#: megatron-core class name -> how LoRA wraps it
BASE_LINEARS: dict[str, BaseLinear] = {
    "ColumnParallelLinear": BaseLinear("column", False, "input_", False),
    "RowParallelLinear": BaseLinear("row", False, "input_", False),
    "TEColumnParallelLinear": BaseLinear("column", False, "x", True),
    "TERowParallelLinear": BaseLinear("row", False, "x", True),
    "TELayerNormColumnParallelLinear": BaseLinear("column", True, "x", True),
}
#: the ``normalization`` values of TE's LayerNormLinear that :func:`fused_input_norm` computes
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
#: parent modules that never call their linears' ``forward``: adapters there would never run
BYPASSING_PARENTS = {
    "TEFusedMLP": "it runs fc1/fc2 as fused Transformer Engine ops on their weights, so an "
                  "adapter hooked on the linears would never run; build the MLP without "
                  "use_te_op_fuser"}
_FUSED_NORM_ATTRS = ("layer_norm_weight", "normalization", "eps", "zero_centered_gamma")


class LoRABaseError(ValueError):
    """A linear LoRA cannot wrap; the message names the module, why, and what to change."""


def recognise_base(base: torch.nn.Module, target: str,
                   split: Literal["column", "row"], expert: bool = False,
                   weight: Optional[torch.Tensor] = None) -> BaseLinear:
    """The table row for ``base`` after checking it can carry an adapter; else
    :class:`LoRABaseError`.

    ``split`` is what ``target`` must be (``linear_qkv``/``linear_fc1`` column,
    ``linear_proj``/``linear_fc2`` row); a base split the other way would pair the wrong
    tensor-parallel reduction with it. ``expert``: a routed expert's linear, whose
    communication the token dispatcher does (megatron-core gives such a Transformer Engine
    linear ``parallel_mode`` ``None``). ``weight``: the base's weight where the module does not
    hold it (``GroupedMMExperts`` keeps its experts' weights in one 3-D parameter).
    """
    name = type(base).__name__
    kind = BASE_LINEARS.get(name)
    where = f"LoRA on {target}"
    if kind is None:
        raise LoRABaseError(
            f"{where}: cannot wrap a {name}; it wraps megatron-core's local or Transformer "
            f"Engine linears ({', '.join(BASE_LINEARS)}); build the model with our layer spec "
            "(--transformer-impl local or transformer_engine)")
    if kind.split != split:
        raise LoRABaseError(f"{where}: {name} is {kind.split}-parallel but {target} must be "
                            f"{split}-parallel; the model's layer spec is not megatron-core's GPT "
                            "spec")
    if weight is None:
        weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise LoRABaseError(f"{where}: this {name} holds no 2-D weight of its own (got "
                            f"{type(weight).__name__}); LoRA needs the base weight allocated "
                            "in the module (no skip_weight_param_allocation)")
    if kind.transformer_engine:
        mode = getattr(base, "parallel_mode", None)
        if mode != split and not (expert and mode is None):
            raise LoRABaseError(f"{where}: {name} has parallel_mode {mode!r}, expected "
                                f"{split!r}; duplicated TE linears are not supported")
    elif split == "column" and getattr(base, "gather_output", False):
        raise LoRABaseError(f"{where}: {name} gathers its output (gather_output=True); LoRA "
                            "needs each rank to keep its own output rows")
    elif split == "row" and not getattr(base, "input_is_parallel", False):
        raise LoRABaseError(f"{where}: {name} scatters its input (input_is_parallel=False); "
                            "LoRA needs the input already split over ranks")
    if kind.normalises_input:
        missing = [a for a in _FUSED_NORM_ATTRS if not hasattr(base, a)]
        if missing:
            raise LoRABaseError(f"{where}: this {name} lacks {missing}, which the adapter needs "
                                "to apply the same input norm as the base; it is not "
                                "megatron-core 0.16's TE layer")
        if base.normalization not in NORMALIZATIONS:
            raise LoRABaseError(f"{where}: {name} normalises with {base.normalization!r}; the "
                                f"adapter computes {' or '.join(NORMALIZATIONS)} only")
    return kind


def adapter_shape(base: torch.nn.Module, weight: Optional[torch.Tensor] = None) -> tuple[int, int]:
    """``(in, out)`` of this rank's adapter: ``A`` is ``[r, in]``, ``B`` is ``[out, r]``.

    Hidden 64, 128 fused QKV rows in all, TP 2: ``linear_qkv`` (column) weight ``[64, 64]`` per
    rank -> ``(64, 64)``; ``linear_proj`` (row) weight ``[64, 32]`` per rank -> ``(32, 64)``.
    """
    out, inp = (base.weight if weight is None else weight).shape
    return int(inp), int(out)


def fused_input_norm(base: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` as TE's ``LayerNormLinear`` applies it before its weight, from the module's
    own parameters; fp32 math (as TE's kernels), cast back to ``x.dtype``.

    - RMSNorm:   ``x · rsqrt(mean(x², -1) + eps) · γ``
    - LayerNorm: ``(x − mean) · rsqrt(var + eps) · γ + β`` (biased variance)

    with ``γ = 1 + layer_norm_weight`` when ``zero_centered_gamma`` (weights stored centred on
    zero), else ``γ = layer_norm_weight``; ``β = layer_norm_bias``.

    >>> from types import SimpleNamespace
    >>> m = SimpleNamespace(normalization="RMSNorm", eps=0.0, zero_centered_gamma=True,
    ...                     layer_norm_weight=torch.zeros(2), layer_norm_bias=None)
    >>> fused_input_norm(m, torch.tensor([[3.0, 4.0]]))  # rms = sqrt(12.5)
    tensor([[0.8485, 1.1314]])
    """
    xf = x.float()
    gamma = base.layer_norm_weight.float()
    if base.zero_centered_gamma:
        gamma = gamma + 1.0
    if base.normalization == "RMSNorm":
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + base.eps) * gamma
    else:
        centred = xf - xf.mean(-1, keepdim=True)
        y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + base.eps) * gamma
        beta = getattr(base, "layer_norm_bias", None)
        if beta is not None:
            y = y + beta.float()
    return y.to(x.dtype)
