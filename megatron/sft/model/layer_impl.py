"""How the transformer layers are implemented: the one place that knows.

Independent choices make a :class:`LayerImpl`:

- ``linear``: ``"te"`` (Transformer Engine modules, each pre-norm fused into the following
  linear) or ``"local"`` (megatron-core's own torch modules, separate norms). Chosen with
  ``--transformer-impl transformer_engine|local|auto``.
- ``attention``: the name of a core-attention backend registered in
  :mod:`megatron.sft.model.attention` (``--attention-backend te|varlen|flex|sdpa|dense|auto``);
  :attr:`LayerImpl.backend` is its :class:`~megatron.sft.model.attention.AttentionBackendSpec`.
- ``experts``: how a Mixture-of-Experts layer computes its routed experts
  (``--moe-experts-impl``, :mod:`megatron.sft.model.moe.experts`): ``grouped_mm``,
  ``sequential`` or ``te``; unused by dense models.

Everything downstream reads the object instead of comparing strings: the layer spec
(:meth:`LayerImpl.layer_spec`), the ``TransformerConfig`` fusion flags
(:meth:`LayerImpl.config_overrides`), what attention needs per micro-batch
(:meth:`LayerImpl.attention_inputs`) and the checkpoint-name renames
(:meth:`LayerImpl.checkpoint_to_model` / :meth:`LayerImpl.model_to_checkpoint`).
:func:`resolve_layer_impl` turns the two flag values into one, with actionable errors.

Adding an attention backend touches ``attention.py`` only: its kernel and one
``register_backend(AttentionBackendSpec(...))`` call next to it (the how-to is that module's
docstring). This module, the CLI choices and help, and the registry-driven tests read it from
there.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Any, Literal, Optional

import torch

from megatron.sft.model.moe import experts as E
from megatron.sft.model.attention.mla import check_mla_layers, use_mla
from megatron.sft.model.attention import (  # noqa: F401  AttentionInputs: re-exported
    AttentionBackendSpec,
    AttentionInputs,
    attention_backend_choices,
    auto_backend,
    get_attention_backend,
)

LinearImpl = Literal["te", "local"]
#: ``--transformer-impl``'s choices (the CLIs read them from here)
TRANSFORMER_IMPLS = ("auto", "transformer_engine", "local")

#: (checkpoint = TE spec suffix, local-spec suffix). Checkpoints always use TE names, as
#: Megatron-LM checkpoints from GPU runs do.
_LOCAL_RENAMES = (
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
    (".self_attention.linear_qkv.layer_norm_bias", ".input_layernorm.bias"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_bias", ".pre_mlp_layernorm.bias"),
)


class LayerImplError(ValueError):
    """A layer implementation or attention backend that cannot run here; says what to use."""


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install must not take the CPU path down with it
        return False
    return True


def _rename(name: str, pairs) -> str:
    for src, dst in pairs:
        if name.endswith(src):
            return name[: -len(src)] + dst
    return name


def _fuses_pre_mlp_norm(name: str, state: dict[str, Any]) -> bool:
    """Whether TE would fuse this local ``pre_mlp_layernorm`` into ``linear_fc1``: only in a
    layer with a dense MLP. A MoE layer keeps its own norm module under both specs, so its
    checkpoint name is ``pre_mlp_layernorm.weight`` too. Likewise ``input_layernorm`` fuses
    into ``linear_qkv`` only where there is one (not in multi-latent attention layers)."""
    if ".input_layernorm." in name:
        return name.split(".input_layernorm.")[0] + ".self_attention.linear_qkv.weight" in state
    if ".pre_mlp_layernorm." not in name:
        return True
    return name.split(".pre_mlp_layernorm.")[0] + ".mlp.linear_fc1.weight" in state


@dataclasses.dataclass(frozen=True)
class LayerImpl:
    linear: LinearImpl
    #: a registered attention backend's name
    attention: str
    #: routed experts of MoE layers: ``grouped_mm``, ``sequential`` or ``te``
    experts: str = "sequential"

    @property
    def backend(self) -> AttentionBackendSpec:
        return get_attention_backend(self.attention)

    # ------------------------------------------------------------------ model construction
    def layer_spec(self, qk_layernorm: bool, sliding_window: Optional[int] = None,
                   **spec_args: Any):
        """megatron-core's GPT layer spec with this implementation's modules; ``spec_args`` go
        to megatron-core's spec builder as they are (an architecture's
        ``MegatronSettings.layer_spec``: ``num_experts``, ``moe_grouped_gemm``, ...)."""
        from megatron.core.models.gpt import gpt_layer_specs as specs

        moe = spec_args.get("num_experts") is not None
        mla = bool(spec_args.pop("multi_latent_attention", False))
        if mla and (reason := check_mla_layers(self.linear)):
            raise LayerImplError(reason)
        if moe:
            spec_args = dict(spec_args, moe_grouped_gemm=self.experts == "te")
        if self.linear == "te":
            spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm,
                                                                    **spec_args)
        else:
            spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm",
                                                  qk_layernorm=qk_layernorm, **spec_args)
        core = self.backend.core_attention(self.linear, sliding_window)
        if core is not None:  # else the spec's own (TEDotProductAttention / DotProductAttention)
            spec.submodules.self_attention.submodules.core_attention = core
        if moe:  # the z-loss weighed as on one rank when tokens are split (moe/router.py)
            from megatron.sft.model.moe.router import SplitBatchRouter

            spec.submodules.mlp.submodules.router = SplitBatchRouter
        if moe and self.experts == "grouped_mm":
            from megatron.sft.model.moe.grouped_mm import GroupedMMExperts

            spec.submodules.mlp.submodules.experts.module = GroupedMMExperts
        if self.linear == "local":
            _use_local_norms(spec)
        if mla:  # DeepSeek-V2/V3: megatron-core's MLA with our packed core attention
            use_mla(spec, self.backend, sliding_window)
        return spec

    def final_norm(self):
        """The decoder's final norm module, as megatron-core picks it (Apex's fused norm when
        Apex imports), but ours where it would be ``WrappedTorchNorm``, which refuses sequence
        parallelism (same torch norm, same parameter names and numbers)."""
        from megatron.core.transformer import transformer_block as tb
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        from megatron.sft.model.norms import LocalNorm

        if self.linear == "local" or tb.LayerNormImpl is WrappedTorchNorm:
            return LocalNorm
        return tb.LayerNormImpl

    def config_overrides(self, *, cpu: bool, sliding_window: Optional[int]) -> dict[str, Any]:
        """``TransformerConfig`` fields that depend on the implementation."""
        fused = self.linear == "te" and not cpu
        out: dict[str, Any] = dict(
            bias_activation_fusion=fused, bias_dropout_fusion=fused,
            masked_softmax_fusion=fused, apply_rope_fusion=fused, persist_layer_norm=fused,
            gradient_accumulation_fusion=False)
        out.update(self.backend.config_overrides(sliding_window))
        return out

    # ------------------------------------------------------------------ per micro-batch
    def attention_inputs(self, cu_seqlens: Optional[torch.Tensor], rows: int, seq_length: int,
                         sliding_window: Optional[int] = None, *, cp_size: int = 1,
                         cp_rank: int = 0) -> AttentionInputs:
        """``cu_seqlens`` is ``collate_sft``'s ``[b, n]`` for packed rows, ``None`` unpacked
        (THD-flattened rows for ``te``, a ``[b, 1, s, s]`` mask for ``dense``, document
        segments for the packed backends). With ``cp_size > 1`` the inputs also say which
        tokens context-parallel rank ``cp_rank`` runs (``AttentionInputs.local_index``)."""
        return self.backend.attention_inputs(cu_seqlens, rows, seq_length, sliding_window,
                                             cp_size=cp_size, cp_rank=cp_rank)

    # ------------------------------------------------------------------ checkpoint names
    def checkpoint_to_model(self, state: dict[str, Any]) -> dict[str, Any]:
        """Checkpoint names -> the names of the modules this implementation builds.

        >>> LayerImpl("local", "sdpa").checkpoint_to_model(
        ...     {"decoder.layers.0.mlp.linear_fc1.layer_norm_weight": 1})
        {'decoder.layers.0.pre_mlp_layernorm.weight': 1}
        """
        if self.experts == "te":
            state = E.te_expert_renames(state, to_checkpoint=False)
        if self.linear == "te":
            return dict(state)
        return {_rename(k, _LOCAL_RENAMES): v for k, v in state.items()}

    def model_to_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        """Inverse of :meth:`checkpoint_to_model`; drops empty ``_extra_state`` entries."""
        state = {k: v for k, v in state.items()
                 if not (k.endswith("._extra_state") and v is None)}
        if self.experts == "te":
            state = E.te_expert_renames(state, to_checkpoint=True)
        if self.linear == "te":
            return state
        inverse = tuple((dst, src) for src, dst in _LOCAL_RENAMES)
        return {(_rename(k, inverse) if _fuses_pre_mlp_norm(k, state) else k): v
                for k, v in state.items()}

    def describe(self) -> str:
        linear = "Transformer Engine" if self.linear == "te" else "megatron-core local"
        return f"{linear} layers, {self.attention} attention"


def _use_local_norms(spec) -> None:
    """Our sequence-parallel-aware norms in a local layer spec (see model/norms.py)."""
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron.sft.model.norms import LocalHeadNorm, LocalNorm

    layer = spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(layer, name) is not IdentityOp:
            setattr(layer, name, LocalNorm)
    attention = layer.self_attention.submodules
    for name in ("q_layernorm", "k_layernorm"):
        if getattr(attention, name, IdentityOp) is not IdentityOp:
            setattr(attention, name, LocalHeadNorm)


# ---------------------------------------------------------------------------- the factory
def resolve_layer_impl(transformer_impl: str = "auto", attention_backend: str = "auto",
                       device_type: Optional[str] = None, moe_experts: str = "sequential",
                       dtype: torch.dtype = torch.float32, cp: int = 1,
                       pp: int = 1, expert_adapters: bool = False) -> LayerImpl:
    """Flag values -> :class:`LayerImpl` (``moe_experts``: ``--moe-experts-impl``, resolved by
    :func:`megatron.sft.model.moe.experts.resolve_experts_impl` for ``dtype``; ``cp``: the
    context-parallel size the attention backend must support with ``pp`` pipeline stages;
    ``expert_adapters``: LoRA on the routed experts).

    ``auto`` linear = TE when it imports and a GPU is in use, else local. ``auto`` attention =
    the first registered backend by ``auto_rank`` that runs here: ``te`` with TE layers, else
    ``varlen`` on CUDA (``flex`` if this torch lacks varlen), else ``sdpa``; with context
    parallelism (``cp > 1``) only backends that do CP are candidates. Asking for something
    that cannot run is an error naming the alternative, never a silent fallback.

    >>> resolve_layer_impl("local", "auto", "cpu")
    LayerImpl(linear='local', attention='sdpa', experts='sequential')
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise LayerImplError(f"--transformer-impl {transformer_impl!r}: use one of "
                             f"{', '.join(TRANSFORMER_IMPLS)}")
    if attention_backend not in attention_backend_choices():
        raise LayerImplError(f"--attention-backend {attention_backend!r}: use one of "
                             f"{', '.join(attention_backend_choices())}")
    if transformer_impl == "auto":
        linear = "te" if device_type == "cuda" and transformer_engine_available() else "local"
    elif transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise LayerImplError(
                "--transformer-impl transformer_engine was requested but transformer_engine is "
                "not importable; use the NVIDIA PyTorch container or --transformer-impl local")
        linear = "te"
    else:
        linear = "local"
    if attention_backend == "auto":
        spec = auto_backend(linear, device_type, cp, pp)
        if spec is None:
            raise LayerImplError(f"no attention backend runs with {linear} layers on "
                                 f"{device_type}" + (f" at context parallel size {cp}" if cp > 1
                                                     else "") + "; give --attention-backend")
    else:
        spec = get_attention_backend(attention_backend)
        reason = spec.check(linear, device_type, cp, pp)
        if reason is not None:
            raise LayerImplError(reason)
    try:
        experts = E.resolve_experts_impl(moe_experts, linear, device_type, dtype,
                                         expert_adapters)
    except E.ExpertsImplError as e:
        raise LayerImplError(str(e)) from None
    return LayerImpl(linear, spec.name, experts)
