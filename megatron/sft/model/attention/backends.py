"""The attention kernels (te, varlen, flex, sdpa, dense), each registered right below its code.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F

from megatron.sft.model.heads import repeat_kv
from megatron.sft.model.context_parallel import kernels as cp_kernels, split as cp_split
from megatron.sft.model.attention.registry import (
    AttentionBackendSpec,
    AttentionInputs,
    register_backend,
)
from megatron.sft.model.attention.segments import (
    banded_causal_mask,
    packed_attention_mask,
    segments_from_cu_seqlens,
)

if TYPE_CHECKING:
    from megatron.sft.model.attention.segments import DocumentSegments


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
        k, v = repeat_kv(k, q.shape[-2]), repeat_kv(v, q.shape[-2])
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


def flex_block_mask(segments: DocumentSegments, window: Optional[int], device):
    """The micro-batch's BlockMask for ``window``, built once and shared by every layer with
    that window (GPT-OSS alternates windowed and full layers: one mask each)."""
    if segments.block_mask is None:
        segments.block_mask = {}
    if window not in segments.block_mask:
        segments.block_mask[window] = _flex_block_mask(segments, window, device)
    return segments.block_mask[window]


def flex_attention_packed(q, k, v, segments: DocumentSegments, scale: float,
                          window: Optional[int] = None) -> torch.Tensor:
    block_mask = flex_block_mask(segments, window, q.device)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, t, d]
    flex = _compiled_flex() if q.device.type == "cuda" else _eager_flex()
    out = flex(qh, kh, vh, block_mask=block_mask, scale=scale,
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
        k, v = repeat_kv(k, hq), repeat_kv(v, hq)
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
    kr, vr = repeat_kv(k, q.shape[-2]), repeat_kv(v, q.shape[-2])
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


