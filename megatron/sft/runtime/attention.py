"""Core attention for packed SFT rows without an s x s tensor: the backends behind
``--attention-backend`` other than Transformer Engine's.

megatron-core's layer spec calls a *core attention* module with ``query [s, b, hq, d]`` and
``key``/``value [s, b, hkv, d]`` (RoPE already applied, heads already split across TP ranks) and
expects ``[s, b, hq * d]`` back. :class:`PackedCoreAttention` is that module. Which tokens may
attend to which is described by :class:`DocumentSegments`, carried to every layer inside
megatron-core's own ``packed_seq_params`` argument (``qkv_format="sbhd"``, so megatron-core
keeps the ``[s, b]`` layout and its usual RoPE: RoPE is relative, so positions that do not restart
at each document give the same attention as positions that do once documents are isolated).

Backends (all causal within a document, GQA without copying K/V where the kernel allows it, an
optional sliding window of ``W`` tokens: query ``i`` sees keys ``i - W < j <= i``, as in HF):

- ``sdpa``   ``scaled_dot_product_attention`` per document (or per row when unpacked); exact, CPU
             and GPU, O(sum l_i^2) work, no s x s tensor unless a window forces a banded mask.
- ``varlen`` ``torch.nn.attention.varlen.varlen_attn`` over the flattened tokens (CUDA).
- ``flex``   ``flex_attention`` with a document-causal ``BlockMask`` (CUDA; compiled).

The pure functions (``segments_from_cu_seqlens``, ``*_attention``) take ``[t, h, d]`` tensors and
are tested directly against a dense masked softmax.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megatron.core.packed_seq_params import PackedSeqParams


# --------------------------------------------------------------------------------- segments
@dataclasses.dataclass
class DocumentSegments(PackedSeqParams):
    """megatron-core's ``PackedSeqParams`` plus what our backends need, computed once per
    micro-batch on the host so no layer synchronises with the GPU to read boundaries.

    ``bounds`` are offsets into the micro-batch flattened row-major to ``b * s`` tokens; every
    row's trailing padding is a document of its own (it attends only to itself).
    """

    bounds: tuple[int, ...] = ()
    rows: int = 1
    row_length: int = 0
    #: created lazily by the flex backend and reused by every layer of the micro-batch
    block_mask: object = None

    @property
    def max_document_length(self) -> int:
        return max(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:]))


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
                      device: torch.device) -> DocumentSegments:
    bounds = segments_from_cu_seqlens(cu_seqlens, rows, seq_length)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    # max_seqlen_* = the row length: megatron-core sizes its RoPE table from it.
    return DocumentSegments(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                            max_seqlen_q=seq_length, max_seqlen_kv=seq_length, bounds=bounds,
                            rows=rows, row_length=seq_length)


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


# --------------------------------------------------------------------------------- backends
# Every backend: q [t, hq, d], k/v [t, hkv, d] (t = flattened tokens), bounds -> [t, hq, d].

def _repeat_kv(k: torch.Tensor, hq: int) -> torch.Tensor:
    return k if k.shape[-2] == hq else k.repeat_interleave(hq // k.shape[-2], dim=-2)


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
    cu = segments.cu_seqlens_q
    longest = segments.max_document_length
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_block_mask(segments: DocumentSegments, window: Optional[int], device):
    from torch.nn.attention.flex_attention import create_block_mask

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


# --------------------------------------------------------------------------------- module
class PackedCoreAttention(torch.nn.Module):
    """Drop-in for megatron-core's ``DotProductAttention`` in a layer spec.

    Built by megatron-core's ``SelfAttention`` with its usual keyword arguments; ``backend``
    and ``window`` are bound by :mod:`megatron.sft.runtime.layer_impl` with
    ``functools.partial``. No parameters, so checkpoints are unaffected.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, *, backend: str,
                 window: Optional[int] = None):
        super().__init__()
        if config.context_parallel_size != 1:
            raise ValueError(f"--attention-backend {backend} does not support context "
                             "parallelism; use --attention-backend te")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"--attention-backend {backend} has no attention dropout "
                             f"(attention_dropout={dropout})")
        self.config = config
        self.backend = backend
        self.window = window
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(
            config.kv_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError(f"--attention-backend {self.backend} takes no attention bias")
        s, b, hq, d = query.shape
        segments = packed_seq_params
        if not isinstance(segments, DocumentSegments):  # unpacked rows: one document per row
            segments = document_segments(None, b, s, query.device)
        # [s, b, h, d] -> [b*s, h, d]: documents are contiguous runs of the flattened rows.
        q, k, v = (x.transpose(0, 1).reshape(b * s, x.shape[2], d) for x in (query, key, value))
        if self.backend == "sdpa":
            out = sdpa_attention(q, k, v, segments.bounds, self.scale, self.window)
        elif self.backend == "varlen":
            out = varlen_attention(q, k, v, segments, self.scale, self.window)
        elif self.backend == "flex":
            out = flex_attention_packed(q, k, v, segments, self.scale, self.window)
        else:  # pragma: no cover - layer_impl only binds the three above
            raise ValueError(f"unknown attention backend {self.backend!r}")
        return out.reshape(b, s, hq * d).transpose(0, 1).contiguous()
