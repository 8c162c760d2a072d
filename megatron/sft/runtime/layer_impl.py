"""How the transformer layers are implemented: the one place that knows.

Two independent choices make a :class:`LayerImpl`:

- ``linear``: ``"te"`` (Transformer Engine modules, each pre-norm fused into the following
  linear) or ``"local"`` (megatron-core's own torch modules, separate norms). Chosen with
  ``--transformer-impl transformer_engine|local|auto``.
- ``attention``: the core-attention backend, ``--attention-backend
  te|varlen|flex|sdpa|dense|auto`` (see :mod:`megatron.sft.runtime.attention`).

Everything downstream reads the object instead of comparing strings: the layer spec
(:meth:`LayerImpl.layer_spec`), the ``TransformerConfig`` fusion flags
(:meth:`LayerImpl.config_overrides`), what attention needs per micro-batch
(:meth:`LayerImpl.attention_inputs`) and the checkpoint-name renames
(:meth:`LayerImpl.checkpoint_to_model` / :meth:`LayerImpl.model_to_checkpoint`).
:func:`resolve_layer_impl` turns the two flag values into one, with actionable errors.

Adding an attention backend: a function in ``attention.py`` taking ``[t, h, d]`` tensors, its
name in ``ATTENTION_BACKENDS``, its requirements in :func:`_check_backend`, and a case in the
backend equality tests (``tests/unit/runtime/test_attention_backends.py`` on CPU,
``tests/gpu/test_attention_backends_gpu.py`` on GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Any, Literal, Optional

import torch

LinearImpl = Literal["te", "local"]
AttentionBackend = Literal["te", "varlen", "flex", "sdpa", "dense"]
ATTENTION_BACKENDS = ("auto", "te", "varlen", "flex", "sdpa", "dense")
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


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """What one micro-batch passes to ``GPTModel.forward`` besides tokens.

    ``flatten_rows``: Transformer Engine's THD path wants the ``b`` rows as one sequence of
    ``b * s`` tokens (``[b, s] -> [1, b*s]``), and its output reshaped back.
    """

    attention_mask: Optional[torch.Tensor] = None
    packed_seq_params: Any = None
    flatten_rows: bool = False


@dataclasses.dataclass(frozen=True)
class LayerImpl:
    linear: LinearImpl
    attention: AttentionBackend

    # ------------------------------------------------------------------ model construction
    def layer_spec(self, qk_layernorm: bool, sliding_window: Optional[int] = None,
                   **spec_args: Any):
        """megatron-core's GPT layer spec with this implementation's modules; ``spec_args`` go
        to megatron-core's spec builder as they are (an architecture's
        ``MegatronSettings.layer_spec``: ``num_experts``, ``moe_grouped_gemm``, ...)."""
        from megatron.core.models.gpt import gpt_layer_specs as specs

        if self.linear == "te":
            spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm,
                                                                    **spec_args)
        else:
            spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm",
                                                  qk_layernorm=qk_layernorm, **spec_args)
        core = self._core_attention(sliding_window)
        if core is not None:
            spec.submodules.self_attention.submodules.core_attention = core
        return spec

    def _core_attention(self, window: Optional[int]):
        if self.attention in ("varlen", "flex", "sdpa"):
            from megatron.sft.runtime.attention import PackedCoreAttention

            return functools.partial(PackedCoreAttention, backend=self.attention, window=window)
        if self.attention == "dense" and self.linear == "te":
            from megatron.core.transformer.dot_product_attention import DotProductAttention

            return DotProductAttention
        return None  # the spec's own: TEDotProductAttention (te) or DotProductAttention (dense)

    def config_overrides(self, *, cpu: bool, sliding_window: Optional[int]) -> dict[str, Any]:
        """``TransformerConfig`` fields that depend on the implementation."""
        fused = self.linear == "te" and not cpu
        out: dict[str, Any] = dict(
            bias_activation_fusion=fused, bias_dropout_fusion=fused,
            masked_softmax_fusion=fused, apply_rope_fusion=fused, persist_layer_norm=fused,
            gradient_accumulation_fusion=False)
        if self.attention == "te" and sliding_window is not None:
            out["window_size"] = (sliding_window - 1, 0)  # flash-attention convention
        return out

    # ------------------------------------------------------------------ per micro-batch
    def attention_inputs(self, cu_seqlens: Optional[torch.Tensor], rows: int, seq_length: int,
                         sliding_window: Optional[int] = None) -> AttentionInputs:
        """``cu_seqlens`` is ``collate_sft``'s ``[b, n]`` for packed rows, ``None`` unpacked."""
        device = cu_seqlens.device if cu_seqlens is not None else None
        if self.attention == "te":
            if cu_seqlens is None:
                return AttentionInputs()
            from megatron.core.packed_seq_params import PackedSeqParams

            from megatron.sft.runtime.attention import segments_from_cu_seqlens

            bounds = segments_from_cu_seqlens(cu_seqlens, rows, seq_length)
            cu = torch.tensor(bounds, dtype=torch.int32, device=device)
            longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
            return AttentionInputs(packed_seq_params=PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                max_seqlen_kv=longest), flatten_rows=True)
        if self.attention == "dense":
            if cu_seqlens is None and sliding_window is None:
                return AttentionInputs()  # megatron-core's own causal mask
            from megatron.sft.runtime.attention import packed_attention_mask

            if cu_seqlens is None:
                cu_seqlens = torch.tensor([[0, seq_length]] * rows)
            return AttentionInputs(attention_mask=packed_attention_mask(
                cu_seqlens, seq_length, window=sliding_window))
        if cu_seqlens is None:
            return AttentionInputs()  # PackedCoreAttention treats each row as one document
        from megatron.sft.runtime.attention import document_segments

        return AttentionInputs(packed_seq_params=document_segments(
            cu_seqlens, rows, seq_length, device))

    # ------------------------------------------------------------------ checkpoint names
    def checkpoint_to_model(self, state: dict[str, Any]) -> dict[str, Any]:
        """Checkpoint names -> the names of the modules this implementation builds.

        >>> LayerImpl("local", "sdpa").checkpoint_to_model(
        ...     {"decoder.layers.0.mlp.linear_fc1.layer_norm_weight": 1})
        {'decoder.layers.0.pre_mlp_layernorm.weight': 1}
        """
        if self.linear == "te":
            return dict(state)
        return {_rename(k, _LOCAL_RENAMES): v for k, v in state.items()}

    def model_to_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        """Inverse of :meth:`checkpoint_to_model`; drops empty ``_extra_state`` entries."""
        state = {k: v for k, v in state.items()
                 if not (k.endswith("._extra_state") and v is None)}
        if self.linear == "te":
            return state
        inverse = tuple((dst, src) for src, dst in _LOCAL_RENAMES)
        return {_rename(k, inverse): v for k, v in state.items()}

    def describe(self) -> str:
        linear = "Transformer Engine" if self.linear == "te" else "megatron-core local"
        return f"{linear} layers, {self.attention} attention"


# ---------------------------------------------------------------------------- the factory
def _check_backend(backend: str, linear: str, device_type: str) -> None:
    if backend == "te" and linear != "te":
        raise LayerImplError(
            "--attention-backend te needs Transformer Engine layers; use --transformer-impl "
            "transformer_engine (NVIDIA PyTorch container), or --attention-backend "
            + ("varlen" if device_type == "cuda" else "sdpa"))
    if backend in ("varlen", "flex") and device_type != "cuda":
        raise LayerImplError(
            f"--attention-backend {backend} runs on CUDA only (torch has no CPU "
            f"{'kernel' if backend == 'varlen' else 'backward'} for it); use "
            "--attention-backend sdpa on CPU")
    if backend == "varlen":
        from megatron.sft.runtime.attention import varlen_available

        if not varlen_available():
            raise LayerImplError(
                f"torch {torch.__version__} has no torch.nn.attention.varlen; use "
                "--attention-backend flex (or sdpa), or torch >= 2.9")
    if backend == "flex":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            raise LayerImplError(f"torch {torch.__version__} has no flex_attention; use "
                                 "--attention-backend sdpa") from None


def resolve_layer_impl(transformer_impl: str = "auto", attention_backend: str = "auto",
                       device_type: Optional[str] = None) -> LayerImpl:
    """Flag values -> :class:`LayerImpl`.

    ``auto`` linear = TE when it imports and a GPU is in use, else local. ``auto`` attention =
    ``te`` with TE layers, else ``varlen`` on CUDA (``flex`` if this torch lacks varlen), else
    ``sdpa``. Asking for something that cannot run is an error naming the alternative, never a
    silent fallback.

    >>> resolve_layer_impl("local", "auto", "cpu")
    LayerImpl(linear='local', attention='sdpa')
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise LayerImplError(f"--transformer-impl {transformer_impl!r}: use one of "
                             f"{', '.join(TRANSFORMER_IMPLS)}")
    if attention_backend not in ATTENTION_BACKENDS:
        raise LayerImplError(f"--attention-backend {attention_backend!r}: use one of "
                             f"{', '.join(ATTENTION_BACKENDS)}")
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
        if linear == "te":
            backend = "te"
        elif device_type == "cuda":
            from megatron.sft.runtime.attention import varlen_available

            backend = "varlen" if varlen_available() else "flex"
        else:
            backend = "sdpa"
    else:
        backend = attention_backend
    _check_backend(backend, linear, device_type)
    return LayerImpl(linear, backend)  # type: ignore[arg-type]
