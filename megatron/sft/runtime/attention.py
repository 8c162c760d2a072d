"""Core attention for packed SFT rows, and the registry behind ``--attention-backend``.

megatron-core's layer spec calls a *core attention* module with ``query [s, b, hq, d]`` and
``key``/``value [s, b, hkv, d]`` (RoPE already applied, heads already split across TP ranks) and
expects ``[s, b, hq * d]`` back. :class:`PackedCoreAttention` is that module for the packed
backends. Which tokens may attend to which is described by :class:`DocumentSegments`, carried to
every layer inside megatron-core's own ``packed_seq_params`` argument (``qkv_format="sbhd"``, so
megatron-core keeps the ``[s, b]`` layout and its usual RoPE: RoPE is relative, so positions that
do not restart at each document give the same attention as positions that do once documents are
isolated).

Backends (all causal within a document, GQA without copying K/V where the kernel allows it, an
optional sliding window of ``W`` tokens: query ``i`` sees keys ``i - W < j <= i``, as in HF), in
the order of ``--attention-backend``'s choices:

- ``te``     Transformer Engine's ``TEDotProductAttention`` on THD-flattened rows (TE layers).
- ``varlen`` ``torch.nn.attention.varlen.varlen_attn`` over the flattened tokens (CUDA).
- ``flex``   ``flex_attention`` with a document-causal ``BlockMask`` (CUDA; compiled).
- ``sdpa``   ``scaled_dot_product_attention`` per document (or per row when unpacked); exact, CPU
             and GPU, O(sum l_i^2) work, no s x s tensor unless a window forces a banded mask.
- ``dense``  megatron-core's ``DotProductAttention`` with a ``[b, 1, s, s]`` mask (reference).

Context parallelism (``--context-parallel-size``): ``sdpa``, ``varlen`` and ``flex`` run this
rank's queries against K/V all-gathered over the CP group (their ``cp_kernel``, in
:mod:`megatron.sft.runtime.cp_kernels`, on the pieces of :mod:`megatron.sft.runtime.cp_split`);
``te`` uses Transformer Engine's own CP attention on documents padded to ``2·CP``; ``dense``
has none.

Each is one :class:`AttentionBackendSpec` registered next to its code; ``--attention-backend``'s
choices and help (``tools/train_sft.py``, ``tools/check_hf_parity.py``), ``auto``'s choice,
the start-up checks, :class:`~megatron.sft.runtime.layer_impl.LayerImpl` and
:class:`PackedCoreAttention` all read the registry.

Adding an attention backend (this file only)
--------------------------------------------
1. Write the kernel ``(q, k, v, segments, scale, window) -> out`` on ``[t, h, d]`` tensors
   (``t`` = the micro-batch's flattened tokens; ``segments.bounds`` for per-document loops,
   ``segments.cu_seqlens_q`` / ``max_document_length`` for varlen kernels).
2. Right below it call ``register_backend(AttentionBackendSpec(name=..., description=...,
   devices=..., requires=..., auto_rank=..., kernel=...))``. That is all: the name becomes a
   CLI choice (in registration order), the description its ``--help`` entry, ``devices``/``requires`` the error at start
   naming the alternative, ``auto_rank`` its place in ``auto``'s order, and
   ``PackedCoreAttention`` calls the kernel. A backend that is not a packed kernel (like ``te``
   or ``dense``) gives ``build_inputs`` (what a micro-batch passes to the model) and
   ``build_core_attention`` (the module in the layer spec) instead. For context parallelism
   give ``cp_kernel`` (local queries against all-gathered K/V, reading
   ``segments.cp_pieces``) or, when the backend's own module does CP, ``cp_native=True`` and
   a ``build_inputs`` that cuts the micro-batch (``AttentionInputs.local_index``).
3. ``tests/unit/runtime/test_attention_registry.py`` iterates the registry: every packed kernel
   that runs on CPU is compared with :func:`dense_reference_attention` there, every one on CUDA
   in ``tests/gpu/test_attention_backends_gpu.py``; nothing to add unless the backend has
   behaviour of its own. (The README's table of backends is for users: give it a row.)

The pure functions (``segments_from_cu_seqlens``, ``*_attention``) take ``[t, h, d]`` tensors and
are tested directly against a dense masked softmax. Importing this module costs no megatron-core
import (``--help`` reads the registry): megatron-core is imported where a backend first needs it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from megatron.sft.runtime import cp_kernels, cp_split


# --------------------------------------------------------------------------------- segments
@functools.lru_cache(maxsize=None)
def _document_segments_class() -> type:
    # Made on first use: its base, megatron-core's PackedSeqParams, imports all of megatron.core
    # (seconds), which the CLI's --help must not pay for reading the backend registry.
    from megatron.core.packed_seq_params import PackedSeqParams

    @dataclasses.dataclass
    class DocumentSegments(PackedSeqParams):
        """megatron-core's ``PackedSeqParams`` plus what our backends need, computed once per
        micro-batch on the host so no layer synchronises with the GPU to read boundaries.

        ``bounds`` are offsets into the micro-batch flattened row-major to ``b * s`` tokens;
        every row's trailing padding is a document of its own (it attends only to itself).
        """

        bounds: tuple[int, ...] = ()
        rows: int = 1
        row_length: int = 0
        #: created lazily by the flex backend and reused by every layer of the micro-batch
        block_mask: object = None
        #: context parallelism: this rank's query pieces (``cp_split.query_pieces``) and the
        #: ``[rows, s / CP]`` global index of its tokens; empty / ``None`` at CP1
        cp_size: int = 1
        cp_pieces: tuple = ()
        cp_query_index: Optional[torch.Tensor] = None
        #: created lazily by the varlen backend at CP > 1 (``cp_kernels.cp_varlen_inputs``)
        cp_varlen: object = None

        @property
        def max_document_length(self) -> int:
            return max(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:]))

    DocumentSegments.__qualname__ = "DocumentSegments"  # pickles as attention.DocumentSegments
    return DocumentSegments


def __getattr__(name: str) -> Any:
    """``from megatron.sft.runtime.attention import DocumentSegments`` builds the class."""
    if name == "DocumentSegments":
        return _document_segments_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def segments_from_cu_seqlens(cu_seqlens: Optional[torch.Tensor], rows: int,
                             seq_length: int) -> tuple[int, ...]:
    """Flattened document boundaries of a micro-batch (pure).

    ``cu_seqlens`` is ``collate_sft``'s ``[b, n]`` (right-padded with -1), or ``None`` for
    unpacked rows (one document per row).

    >>> segments_from_cu_seqlens(torch.tensor([[0, 3, 5, -1], [0, 6, -1, -1]]), 2, 6)
    (0, 3, 5, 6, 12)
    >>> segments_from_cu_seqlens(None, 2, 4)
    (0, 4, 8)
    """
    if cu_seqlens is None:
        return tuple(range(0, rows * seq_length + 1, seq_length))
    bounds = [0]
    for row, cu in enumerate(cu_seqlens.tolist()):
        ends = [c for c in cu if c > 0]
        if not ends or ends[-1] != seq_length:
            ends.append(seq_length)
        bounds.extend(row * seq_length + e for e in ends)
    return tuple(bounds)


def document_segments(cu_seqlens: Optional[torch.Tensor], rows: int, seq_length: int,
                      device: torch.device, *, cp_size: int = 1, cp_rank: int = 0,
                      window: Optional[int] = None) -> DocumentSegments:
    """``seq_length`` is the whole row's length, at any CP size."""
    bounds = segments_from_cu_seqlens(cu_seqlens, rows, seq_length)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    cp = {}
    if cp_size > 1:
        cp = dict(cp_size=cp_size,
                  cp_pieces=cp_split.query_pieces(bounds, rows, seq_length, cp_size, cp_rank,
                                                  window),
                  cp_query_index=cp_split.local_token_index(rows, seq_length, cp_size,
                                                            cp_rank).to(device))
    # max_seqlen_* = the row length: megatron-core sizes its RoPE table from it (and, at CP > 1,
    # gives each rank the positions of its chunks, the ones cp_split gives it).
    return _document_segments_class()(
        qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=seq_length,
        max_seqlen_kv=seq_length, bounds=bounds, rows=rows, row_length=seq_length, **cp)


def segment_ids(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """``[b, s]`` id of the packed sample each position belongs to; positions after the last
    boundary (padding) form one more segment of their own.

    >>> segment_ids(torch.tensor([[0, 3, 5, -1]]), 6).tolist()
    [[0, 0, 0, 1, 1, 2]]
    """
    rows = []
    positions = torch.arange(seq_length, device=cu_seqlens.device)
    for cu in cu_seqlens:
        bounds = cu[cu >= 0][1:].to(positions.dtype)
        rows.append(torch.bucketize(positions, bounds, right=True))
    return torch.stack(rows)


def packed_attention_mask(cu_seqlens: torch.Tensor, seq_length: int,
                          window: Optional[int] = None) -> torch.Tensor:
    """Block-diagonal causal mask ``[b, 1, s, s]``, ``True`` = masked out (megatron-core's
    convention): a token attends to earlier tokens of its own sample only (and, with a sliding
    ``window``, only to the last ``window`` of them, itself included).

    With ``cu_seqlens=[[0, 2, 3]]`` and ``s=3``, allowed (``False``) entries are
    ``(0,0) (1,0) (1,1) (2,2)``. This is the ``dense`` attention backend: O(s^2) memory, kept as
    the reference the other backends are tested against.
    """
    seg = segment_ids(cu_seqlens, seq_length)
    same = seg.unsqueeze(-1) == seg.unsqueeze(-2)
    return ~(same & banded_causal_mask(seq_length, window, cu_seqlens.device)).unsqueeze(1)


def banded_causal_mask(length: int, window: Optional[int], device=None) -> torch.Tensor:
    """``[l, l]`` bool, ``True`` = may attend: causal, and within ``window`` tokens if given.

    >>> banded_causal_mask(4, 2).int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    i = torch.arange(length, device=device)
    diff = i[:, None] - i[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


# --------------------------------------------------------------------------------- registry
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
    #: window)`` after the K/V all-gather (:mod:`megatron.sft.runtime.cp_kernels`)
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
    def check(self, linear: str, device_type: str, cp: int = 1) -> Optional[str]:
        """Why this backend cannot run with ``linear`` layers (``"te"`` / ``"local"``) on
        ``device_type`` (at context parallel size ``cp``), naming the alternative; ``None``
        when it can."""
        if cp > 1 and not self.supports_cp:
            others = [s.name for s in attention_backends() if s.supports_cp
                      and s.check(linear, device_type, cp) is None]
            return (f"--attention-backend {self.name} has no context parallelism "
                    f"(--context-parallel-size {cp}); use --attention-backend "
                    f"{' or '.join(others) or 'sdpa'}")
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


def auto_backend(linear: str, device_type: str, cp: int = 1) -> Optional[AttentionBackendSpec]:
    """``auto``: the first backend of :func:`auto_order` that runs here, at context parallel
    size ``cp`` (``None`` if none)."""
    return next((s for s in auto_order() if s.check(linear, device_type, cp) is None), None)


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


# --------------------------------------------------------------------------------- backends
# In --attention-backend's order; each registers right below its code.

def _te_thd_inputs(cu_seqlens: Optional[torch.Tensor], rows: int, seq_length: int,
                   window: Optional[int] = None, *, cp_size: int = 1,
                   cp_rank: int = 0) -> AttentionInputs:
    """Transformer Engine's THD format: the ``b`` rows become one sequence of ``b * s`` tokens
    with document boundaries ``cu_seqlens`` (``max_seqlen`` = the longest document). At CP > 1
    every document is padded to ``2·CP`` and this rank keeps chunks ``r`` and ``2·CP−1−r`` of
    each (``cp_split.thd_layout``), the layout TE's CP attention and megatron-core's THD RoPE
    expect (``cu_seqlens_*_padded``)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if cp_size > 1:
        bounds = segments_from_cu_seqlens(cu_seqlens, rows, seq_length)
        layout = cp_split.thd_layout(bounds, cp_size, cp_rank)
        device = cu_seqlens.device if cu_seqlens is not None else torch.device("cpu")
        cu = torch.tensor(layout.cu_seqlens, dtype=torch.int32, device=device)
        cu_pad = torch.tensor(layout.cu_seqlens_padded, dtype=torch.int32, device=device)
        return AttentionInputs(packed_seq_params=PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
            cu_seqlens_kv_padded=cu_pad, max_seqlen_q=layout.max_seqlen,
            max_seqlen_kv=layout.max_seqlen), flatten_rows=True,
            local_index=layout.index.to(device))
    if cu_seqlens is None:
        return AttentionInputs()
    bounds = segments_from_cu_seqlens(cu_seqlens, rows, seq_length)
    cu = torch.tensor(bounds, dtype=torch.int32, device=cu_seqlens.device)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return AttentionInputs(packed_seq_params=PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
        max_seqlen_kv=longest), flatten_rows=True)


def _te_window(window: Optional[int]) -> dict[str, Any]:
    # TEDotProductAttention reads the window from the config (flash-attention convention).
    return {} if window is None else {"window_size": (window - 1, 0)}


register_backend(AttentionBackendSpec(
    name="te", description="Transformer Engine THD", needs_te_layers=True, auto_rank=10,
    build_inputs=_te_thd_inputs, config_overrides=_te_window, cp_native=True))


# Packed kernels: q [t, hq, d], k/v [t, hkv, d] (t = flattened tokens), segments -> [t, hq, d].
def _repeat_kv(k: torch.Tensor, hq: int) -> torch.Tensor:
    return k if k.shape[-2] == hq else k.repeat_interleave(hq // k.shape[-2], dim=-2)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


@functools.lru_cache(maxsize=None)
def _varlen_signature() -> Optional[frozenset]:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_available() -> bool:
    return _varlen_signature() is not None


def varlen_attention(q, k, v, segments: DocumentSegments, scale: float,
                     window: Optional[int] = None) -> torch.Tensor:
    """PyTorch's variable-length flash attention over all documents of the micro-batch at once.

    Its keyword set changed across torch releases (``is_causal`` in 2.9/2.10; ``window_size``
    with ``(-1, 0)`` meaning causal later; ``enable_gqa`` from some release on), so the call is
    built from the installed signature.
    """
    from torch.nn.attention.varlen import varlen_attn

    if q.dtype not in (torch.float16, torch.bfloat16):
        # Flash kernels take half precision only; fp32 runs (parity checks) stay exact.
        _warn_once(f"varlen attention needs bf16/fp16, got {q.dtype}: using sdpa per document")
        if segments.cp_size > 1:
            return cp_kernels.sdpa_cp_attention(q, k, v, segments, scale, window)
        return sdpa_attention(q, k, v, segments.bounds, scale, window)
    params = _varlen_signature()
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scale
    else:  # the kernel's default is 1/sqrt(head_dim)
        q = q * (scale * math.sqrt(q.shape[-1]))
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    else:
        k, v = _repeat_kv(k, q.shape[-2]), _repeat_kv(v, q.shape[-2])
    if "window_size" in params:
        kwargs["window_size"] = (window - 1 if window else -1, 0)
    elif window is not None:
        raise ValueError("this torch's varlen_attn has no window_size; use "
                         "--attention-backend flex or sdpa for sliding-window models")
    if "is_causal" in params:
        kwargs["is_causal"] = True
    if segments.cp_size > 1:  # one "sequence" per piece, its keys copied out of the gather
        cu_q, cu_k, key_index, max_q, max_k = cp_kernels.cp_varlen_inputs(segments, q.device)
        k, v = k.index_select(0, key_index), v.index_select(0, key_index)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    cu = segments.cu_seqlens_q
    longest = segments.max_document_length
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)


def _varlen_missing() -> Optional[str]:
    if varlen_available():
        return None
    return (f"torch {torch.__version__} has no torch.nn.attention.varlen; use "
            "--attention-backend flex (or sdpa), or torch >= 2.9")


register_backend(AttentionBackendSpec(
    name="varlen", description="torch flash varlen", devices=("cuda",),
    devices_why="torch has no CPU kernel for it", requires=_varlen_missing, auto_rank=20,
    kernel=varlen_attention, cp_kernel=varlen_attention))


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_block_mask(segments: DocumentSegments, window: Optional[int], device):
    from torch.nn.attention.flex_attention import create_block_mask

    if segments.cp_size > 1:  # local queries at their global positions, every key
        mask_mod, q_len, kv_len = cp_kernels.cp_flex_mask_mod(segments, window, device)
        return create_block_mask(mask_mod, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len,
                                 device=device, _compile=device.type == "cuda")
    total = segments.bounds[-1]
    lengths = torch.tensor([b - a for a, b in zip(segments.bounds[:-1], segments.bounds[1:])],
                           device=device)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)

    def document_causal(b, h, q_idx, kv_idx):
        allowed = (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
        if window is not None:
            allowed = allowed & (q_idx - kv_idx < window)
        return allowed

    # Compiled on CUDA so the mask is evaluated block by block, never as a t x t tensor.
    return create_block_mask(document_causal, B=None, H=None, Q_LEN=total, KV_LEN=total,
                             device=device, _compile=device.type == "cuda")


def flex_attention_packed(q, k, v, segments: DocumentSegments, scale: float,
                          window: Optional[int] = None) -> torch.Tensor:
    if segments.block_mask is None:  # built once per micro-batch, shared by all layers
        segments.block_mask = _flex_block_mask(segments, window, q.device)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, t, d]
    flex = _compiled_flex() if q.device.type == "cuda" else _eager_flex()
    out = flex(qh, kh, vh, block_mask=segments.block_mask, scale=scale,
               enable_gqa=qh.shape[1] != kh.shape[1])
    return out.squeeze(0).transpose(0, 1)


def _eager_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def _flex_missing() -> Optional[str]:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no flex_attention; use --attention-backend sdpa"
    return None


register_backend(AttentionBackendSpec(
    name="flex", description="flex_attention", devices=("cuda",),
    devices_why="torch has no CPU backward for it", requires=_flex_missing, auto_rank=30,
    kernel=flex_attention_packed, cp_kernel=flex_attention_packed))


def sdpa_attention(q, k, v, bounds: tuple[int, ...], scale: float,
                   window: Optional[int] = None) -> torch.Tensor:
    """One ``scaled_dot_product_attention`` call per document (causal, GQA)."""
    hq = q.shape[-2]
    # CPU's flash kernel takes grouped K/V as they are; CUDA's fused kernels do not all do, so
    # there K/V are expanded (b*s*h*d more memory, never s*s).
    gqa = {"enable_gqa": True} if q.device.type == "cpu" else None
    if gqa is None:
        k, v = _repeat_kv(k, hq), _repeat_kv(v, hq)
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        length = end - start
        if window is not None and length > window:
            mask = banded_causal_mask(length, window, q.device)
            out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale,
                                                 **(gqa or {}))
        else:
            out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale,
                                                 **(gqa or {}))
        outs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outs, dim=0)


def _sdpa_kernel(q, k, v, segments: DocumentSegments, scale: float,
                 window: Optional[int] = None) -> torch.Tensor:
    return sdpa_attention(q, k, v, segments.bounds, scale, window)


register_backend(AttentionBackendSpec(
    name="sdpa", description="per document, CPU and GPU", auto_rank=100,  # runs anywhere
    kernel=_sdpa_kernel, cp_kernel=cp_kernels.sdpa_cp_attention))


def dense_reference_attention(q, k, v, bounds: tuple[int, ...], scale: float,
                              window: Optional[int] = None) -> torch.Tensor:
    """Materialised ``t x t`` masked softmax: the reference the other backends are tested
    against (never used for training)."""
    t = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=q.device),
                                  torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])],
                                               device=q.device))
    allowed = (doc[:, None] == doc[None, :]) & banded_causal_mask(t, window, q.device)
    kr, vr = _repeat_kv(k, q.shape[-2]), _repeat_kv(v, q.shape[-2])
    dtype = torch.promote_types(q.dtype, torch.float32)  # bf16 inputs: softmax in fp32
    scores = torch.einsum("qhd,khd->hqk", q.to(dtype), kr.to(dtype)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vr.to(dtype)).to(q.dtype)


def _dense_mask_inputs(cu_seqlens: Optional[torch.Tensor], rows: int, seq_length: int,
                       window: Optional[int] = None, *, cp_size: int = 1,
                       cp_rank: int = 0) -> AttentionInputs:
    """megatron-core's attention with our ``[b, 1, s, s]`` block-diagonal causal mask."""
    if cu_seqlens is None and window is None:
        return AttentionInputs()  # megatron-core's own causal mask
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([[0, seq_length]] * rows)
    return AttentionInputs(attention_mask=packed_attention_mask(cu_seqlens, seq_length,
                                                                window=window))


def _dense_core_attention(linear: str, window: Optional[int]):
    if linear != "te":
        return None  # the local spec's own DotProductAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention  # with TE layers too: megatron-core's own applies the mask


register_backend(AttentionBackendSpec(
    name="dense", description="s x s mask, reference only",
    build_inputs=_dense_mask_inputs, build_core_attention=_dense_core_attention))


# --------------------------------------------------------------------------------- module
class PackedCoreAttention(torch.nn.Module):
    """Drop-in for megatron-core's ``DotProductAttention`` in a layer spec, running a packed
    backend's registered kernel.

    Built by megatron-core's ``SelfAttention`` with its usual keyword arguments; ``backend``
    and ``window`` are bound with ``functools.partial`` by
    :meth:`AttentionBackendSpec.core_attention`. No parameters, so checkpoints are unaffected.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, *, backend: str,
                 window: Optional[int] = None):
        super().__init__()
        spec = get_attention_backend(backend)
        kernel = spec.kernel
        if kernel is None:
            raise ValueError(f"--attention-backend {backend} has no packed kernel: its layer "
                             "spec keeps megatron-core's core attention")
        self.cp_size = config.context_parallel_size
        if self.cp_size > 1:
            if spec.cp_kernel is None:
                raise ValueError(spec.check("local", "cpu", self.cp_size))
            kernel = spec.cp_kernel
        #: the context-parallel group (megatron-core hands its process groups to the module)
        self.cp_group = getattr(pg_collection, "cp", None)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"--attention-backend {backend} has no attention dropout "
                             f"(attention_dropout={dropout})")
        self.config = config
        self.backend = backend
        self.kernel = kernel
        self.window = window
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(
            config.kv_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError(f"--attention-backend {self.backend} takes no attention bias")
        s, b, hq, d = query.shape
        segments = packed_seq_params
        if self.cp_size > 1:
            return self._context_parallel(query, key, value, segments)
        if not isinstance(segments, _document_segments_class()):  # unpacked: a document a row
            segments = document_segments(None, b, s, query.device)
        # [s, b, h, d] -> [b*s, h, d]: documents are contiguous runs of the flattened rows.
        q, k, v = (x.transpose(0, 1).reshape(b * s, x.shape[2], d) for x in (query, key, value))
        out = self.kernel(q, k, v, segments, self.scale, self.window)
        return out.reshape(b, s, hq * d).transpose(0, 1).contiguous()

    def _context_parallel(self, query, key, value, segments):
        """This rank's ``s / CP`` queries against every rank's keys and values: K/V are
        all-gathered over the CP group (backward reduce-scatters dK, dV), put back in row
        order, and the backend's ``cp_kernel`` runs on the rank's pieces."""
        from megatron.sft.runtime.context_parallel import gather_sequence

        if not isinstance(segments, _document_segments_class()) or segments.cp_size != \
                self.cp_size:
            raise ValueError(f"--attention-backend {self.backend} at context parallel size "
                             f"{self.cp_size} needs this rank's document pieces in "
                             "packed_seq_params (AttentionBackendSpec.attention_inputs with "
                             "cp_size)")
        s_local, b, hq, d = query.shape
        s = segments.row_length
        key, value = (gather_sequence(x, s, self.cp_group) for x in (key, value))
        q = query.transpose(0, 1).reshape(b * s_local, hq, d)
        k, v = (x.transpose(0, 1).reshape(b * s, x.shape[2], d) for x in (key, value))
        out = self.kernel(q, k, v, segments, self.scale, self.window)
        return out.reshape(b, s_local, hq * d).transpose(0, 1).contiguous()
