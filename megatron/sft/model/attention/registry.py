"""The attention-backend registry behind ``--attention-backend``: one
:class:`AttentionBackendSpec` per backend, registered next to its kernel in
:mod:`megatron.sft.model.attention.backends`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import torch

from megatron.sft.model.attention.segments import document_segments


# --------------------------------------------------------------------------------- registry
#: TE's CP pads every document to 2·CP, so a rank's THD tokens vary per micro-batch and the
#: pipeline's fixed activation shape cannot carry them (``AttentionBackendSpec.cp_problem``)
TE_CP_PIPELINE = ("--attention-backend te with --context-parallel-size > 1 and "
                  "--pipeline-model-parallel-size > 1: TE pads each document to 2 x CP, so the "
                  "tokens per rank change per micro-batch and cannot cross pipeline stages; use "
                  "--attention-backend varlen (or flex) with --transformer-impl local, or PP 1")


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """What one micro-batch passes to ``GPTModel.forward`` besides tokens.

    ``flatten_rows``: Transformer Engine's THD path wants the ``b`` rows as one sequence of
    ``b * s`` tokens (``[b, s] -> [1, b*s]``), and its output reshaped back.

    ``local_index``: with context parallelism, the tokens this rank runs, as indices into the
    micro-batch flattened to ``b * s`` (``-1``: a padding token); the micro-batch's tokens,
    labels, loss mask and positions are cut with it (``cp_split.take_tokens``). ``None``: all.
    """

    attention_mask: Optional[torch.Tensor] = None
    packed_seq_params: Any = None
    flatten_rows: bool = False
    local_index: Optional[torch.Tensor] = None


#: a packed backend's kernel: q [t, hq, d], k/v [t, hkv, d], DocumentSegments, softmax scale,
#: sliding window (or None) -> [t, hq, d]
Kernel = Callable[..., torch.Tensor]
#: (cu_seqlens [b, n] or None when unpacked, rows, seq_length, sliding window, *, cp_size,
#: cp_rank) -> AttentionInputs
InputsBuilder = Callable[..., AttentionInputs]


def _nothing_missing() -> Optional[str]:
    return None


def _no_config_overrides(window: Optional[int]) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class AttentionBackendSpec:
    """One ``--attention-backend`` choice: everything the CLI, the start-up check, the layer
    spec, the per-micro-batch inputs and :class:`PackedCoreAttention` need to know about it
    (the module docstring says how to add one).

    >>> sdpa, flex = get_attention_backend("sdpa"), get_attention_backend("flex")
    >>> sdpa.check("local", "cpu") is None, flex.check("local", "cpu")[:42]
    (True, '--attention-backend flex runs on CUDA only')
    """

    name: str
    #: one line for ``--help``
    description: str
    #: devices it runs on (``torch.device.type``); ``None``: wherever its layers run
    devices: Optional[tuple[str, ...]] = None
    #: why not elsewhere, quoted by the error (e.g. "torch has no CPU kernel for it")
    devices_why: str = ""
    #: runs inside Transformer Engine layers only (``--transformer-impl transformer_engine``)
    needs_te_layers: bool = False
    #: what this installation lacks to run it ("torch 2.4 has no ...; use ..."), or ``None``
    requires: Callable[[], Optional[str]] = _nothing_missing
    #: place in ``auto``'s order, lowest first (the first whose check passes is used);
    #: ``None``: never chosen by ``auto``
    auto_rank: Optional[int] = None
    #: packed backends: called by :class:`PackedCoreAttention` on the flattened tokens
    kernel: Optional[Kernel] = None
    #: what a micro-batch passes to the model; default for packed backends:
    #: :func:`packed_attention_inputs`
    build_inputs: Optional[InputsBuilder] = None
    #: ``(linear, window) -> core-attention module`` for the layer spec, ``None`` = the spec's own
    #: (``TEDotProductAttention`` with TE layers, ``DotProductAttention`` local); default for
    #: packed backends: :class:`PackedCoreAttention` bound to this backend
    build_core_attention: Optional[Callable[[str, Optional[int]], Any]] = None
    #: ``window -> TransformerConfig`` fields this backend reads (e.g. TE's ``window_size``)
    config_overrides: Callable[[Optional[int]], dict[str, Any]] = _no_config_overrides
    #: context parallelism, packed backends: ``(q_local, k_all, v_all, segments, scale,
    #: window)`` after the K/V all-gather (:mod:`megatron.sft.model.context_parallel.kernels`)
    cp_kernel: Optional[Kernel] = None
    #: context parallelism done by the backend's own core attention (TE); its ``build_inputs``
    #: cuts the micro-batch
    cp_native: bool = False

    def __post_init__(self):
        if not self.name or self.name == "auto":
            raise ValueError(f"attention backend name {self.name!r}: give a name other than "
                             "'' and 'auto' ('auto' picks among the registered backends)")
        if not self.description.strip() or "\n" in self.description:
            raise ValueError(f"attention backend {self.name!r}: give a one-line description "
                             "(it is the --help entry)")
        if self.kernel is None and self.build_inputs is None:
            raise ValueError(f"attention backend {self.name!r}: give a kernel (packed "
                             "backends) or build_inputs (what a micro-batch passes)")

    @property
    def supports_cp(self) -> bool:
        return self.cp_kernel is not None or self.cp_native

    # ------------------------------------------------------------------ can it run here
    def cp_problem(self, cp: int, pp: int = 1, linear: Optional[str] = None,
                   device_type: Optional[str] = None) -> Optional[str]:
        """Why this backend cannot do context parallelism ``cp`` with ``pp`` pipeline stages,
        naming the alternative; ``None`` when it can. The one place that decides "is CP allowed
        with this attention": the flag check (before the device is known), ``auto``'s choice and
        the layer factory all ask it."""
        if cp <= 1:
            return None
        if not self.supports_cp:
            others = [s.name for s in attention_backends() if s.supports_cp and (
                s.check(linear, device_type, cp, pp) is None if linear and device_type
                else s.cp_problem(cp, pp) is None)]
            return (f"--attention-backend {self.name} has no context parallelism "
                    f"(--context-parallel-size {cp}); use --attention-backend "
                    f"{' or '.join(others) or 'sdpa'}")
        if self.cp_native and pp > 1:
            return TE_CP_PIPELINE
        return None

    def check(self, linear: str, device_type: str, cp: int = 1, pp: int = 1) -> Optional[str]:
        """Why this backend cannot run with ``linear`` layers (``"te"`` / ``"local"``) on
        ``device_type`` (at context parallel size ``cp`` with ``pp`` pipeline stages), naming
        the alternative; ``None`` when it can."""
        reason = self.cp_problem(cp, pp, linear, device_type)
        if reason is not None:
            return reason
        if self.needs_te_layers and linear != "te":
            return (f"--attention-backend {self.name} needs Transformer Engine layers; use "
                    "--transformer-impl transformer_engine (NVIDIA PyTorch container), or "
                    "--attention-backend " + ("varlen" if device_type == "cuda" else "sdpa"))
        if self.devices is not None and device_type not in self.devices:
            why = f" ({self.devices_why})" if self.devices_why else ""
            return (f"--attention-backend {self.name} runs on {self._devices_text()} only{why}; "
                    f"use --attention-backend sdpa on {device_type.upper()}")
        return self.requires()

    def _devices_text(self) -> str:
        return " and ".join(d.upper() for d in self.devices or ())

    # ------------------------------------------------------------------ what it builds
    def attention_inputs(self, cu_seqlens: Optional[torch.Tensor], rows: int, seq_length: int,
                         window: Optional[int] = None, *, cp_size: int = 1,
                         cp_rank: int = 0) -> AttentionInputs:
        if cp_size > 1 and not self.supports_cp:
            raise ValueError(self.check("local", "cpu", cp_size))
        build = self.build_inputs or packed_attention_inputs
        return build(cu_seqlens, rows, seq_length, window, cp_size=cp_size, cp_rank=cp_rank)

    def core_attention(self, linear: str, window: Optional[int]):
        """The layer spec's core-attention module, or ``None`` to keep the spec's own."""
        if self.build_core_attention is not None:
            return self.build_core_attention(linear, window)
        if self.kernel is not None:
            from megatron.sft.model.attention.core import PackedCoreAttention

            return functools.partial(PackedCoreAttention, backend=self.name, window=window)
        return None


_BACKENDS: dict[str, AttentionBackendSpec] = {}


def register_backend(spec: AttentionBackendSpec) -> AttentionBackendSpec:
    """Add ``spec`` to the registry (CLI order = registration order) and return it. Call it at
    module level next to the backend's code; a name registered twice is an error."""
    if spec.name in _BACKENDS:
        raise ValueError(f"attention backend {spec.name!r} is registered twice")
    _BACKENDS[spec.name] = spec
    return spec


def attention_backends() -> tuple[AttentionBackendSpec, ...]:
    """Every registered backend, in registration (= ``--help``) order."""
    return tuple(_BACKENDS.values())


def get_attention_backend(name: str) -> AttentionBackendSpec:
    """The registered backend called ``name`` (``ValueError`` listing the choices if none)."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"--attention-backend {name!r}: use one of "
                         f"{', '.join(attention_backend_choices())}") from None


def attention_backend_choices() -> tuple[str, ...]:
    """``--attention-backend``'s choices: ``("auto", <registered names>...)``."""
    return ("auto",) + tuple(_BACKENDS)


def auto_order() -> tuple[AttentionBackendSpec, ...]:
    """The backends ``auto`` tries, first to last (by ``auto_rank``).

    >>> [s.name for s in auto_order()]
    ['te', 'varlen', 'flex', 'sdpa']
    """
    ranked = [s for s in _BACKENDS.values() if s.auto_rank is not None]
    return tuple(sorted(ranked, key=lambda s: s.auto_rank))


def auto_backend(linear: str, device_type: str, cp: int = 1,
                 pp: int = 1) -> Optional[AttentionBackendSpec]:
    """``auto``: the first backend of :func:`auto_order` that runs here, at context parallel
    size ``cp`` with ``pp`` pipeline stages (``None`` if none)."""
    return next((s for s in auto_order() if s.check(linear, device_type, cp, pp) is None), None)


def attention_backend_help() -> str:
    """``--attention-backend``'s help text, from the registered descriptions."""
    def needs(s: AttentionBackendSpec) -> str:
        if s.needs_te_layers:
            return "; needs TE layers"
        return f"; {s._devices_text()} only" if s.devices else ""

    def when(s: AttentionBackendSpec) -> str:
        if s.needs_te_layers:
            return f"{s.name} with TE layers"
        return f"{s.name} on {s._devices_text()}" if s.devices else s.name

    entries = ", ".join(f"{s.name} ({s.description}{needs(s)})" for s in attention_backends())
    return (f"core attention for packed rows: {entries}; auto = "
            f"{', else '.join(when(s) for s in auto_order())}")


def packed_attention_inputs(cu_seqlens: Optional[torch.Tensor], rows: int, seq_length: int,
                            window: Optional[int] = None, *, cp_size: int = 1,
                            cp_rank: int = 0) -> AttentionInputs:
    """The packed backends' inputs: :class:`DocumentSegments` as ``packed_seq_params``; at
    CP > 1 also for unpacked rows (a document a row), with this rank's pieces and tokens."""
    if cp_size > 1:
        device = cu_seqlens.device if cu_seqlens is not None else torch.device("cpu")
        segments = document_segments(cu_seqlens, rows, seq_length, device, cp_size=cp_size,
                                     cp_rank=cp_rank, window=window)
        return AttentionInputs(packed_seq_params=segments,
                               local_index=segments.cp_query_index)
    if cu_seqlens is None:
        return AttentionInputs()  # PackedCoreAttention treats each row as one document
    return AttentionInputs(packed_seq_params=document_segments(
        cu_seqlens, rows, seq_length, cu_seqlens.device))


