"""Context-parallel attention kernels: this rank's queries against the all-gathered keys and
values, causal within each document (pure torch: no process group).

Every kernel takes ``q [tq, hq, d]`` (the rank's local tokens, flattened row-major over the
micro-batch's rows), ``k, v [t, hkv, d]`` (every token of the micro-batch in CP1 order, after
the all-gather of :mod:`megatron.sft.model.context_parallel.gather`), the micro-batch's
``DocumentSegments`` (whose ``cp_pieces`` come from :func:`cp_split.query_pieces`), the softmax
scale and an optional sliding window; it returns ``[tq, hq, d]``. All three read the same
pieces, so the bookkeeping is tested once, on CPU
(``tests/unit/runtime/test_context_parallel_math.py``):

- ``sdpa``: one call per piece. A piece whose document started before it sees more keys than
  it has queries; its causal mask is aligned to the bottom-right corner, which
  ``scaled_dot_product_attention``'s ``is_causal`` (top-left) is not. On CPU the piece is split
  into its *prefix* keys (every query sees them) and its *diagonal* (a square causal block),
  each run by torch's CPU flash kernel, and the two softmaxes merged by their log-sum-exp
  (:class:`PrefixCausalAttention`; backward runs the kernel's backward per block with the merged
  output and log-sum-exp, exact as in ring attention). No ``queries x keys`` tensor is made. On
  CUDA, ``torch.nn.attention.bias.causal_lower_right`` does the same in one fused call.
- ``varlen``: one varlen call; the pieces are its sequences (``cu_seqlens_q`` over the local
  queries, ``cu_seqlens_k`` over keys copied out per piece), flash's causal mask being
  bottom-right aligned when a sequence has more keys than queries.
- ``flex``: a BlockMask of ``tq`` queries x ``t`` keys whose ``mask_mod`` reads each query's
  global position (``DocumentSegments.cp_query_index``): document-causal as at CP1.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.sft.model.heads import repeat_kv
from megatron.sft.model.context_parallel.split import document_ids, varlen_layout


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[l, h, d] -> [1, h, l, d]`` contiguous (what the flash kernels take)."""
    return x.transpose(0, 1).unsqueeze(0).contiguous()


@functools.lru_cache(maxsize=None)
def _cpu_flash_ops():
    """torch's CPU flash-attention forward (returning the log-sum-exp) and backward, or
    ``None`` when this torch lacks them (private ops: checked, never assumed)."""
    aten = torch.ops.aten
    try:
        return (aten._scaled_dot_product_flash_attention_for_cpu.default,
                aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
    except (AttributeError, RuntimeError):
        return None


class PrefixCausalAttention(torch.autograd.Function):
    """Attention of ``L`` queries over ``S > L`` keys, query ``i`` seeing keys ``< S - L + i + 1``
    (bottom-right causal), on ``[1, h, l, d]`` tensors, via torch's CPU flash kernel.

    Forward: ``(o_p, lse_p)`` over the ``S - L`` prefix keys (no mask) and ``(o_d, lse_d)`` over
    the last ``L`` (square causal); ``lse = logaddexp(lse_p, lse_d)``,
    ``out = o_p·exp(lse_p − lse) + o_d·exp(lse_d − lse)``. Backward: the kernel's backward on
    each block with the merged ``out`` and ``lse`` gives each block's exact share of dq and its own
    dk, dv (softmax probabilities are ``exp(score − lse)`` with the global ``lse``). GQA: the
    kernel takes fewer K/V heads as they are.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale):
        forward, _ = _cpu_flash_ops()
        n = k.shape[2] - q.shape[2]
        kp, kd = k[:, :, :n].contiguous(), k[:, :, n:].contiguous()
        vp, vd = v[:, :, :n].contiguous(), v[:, :, n:].contiguous()
        o_p, lse_p = forward(q, kp, vp, 0.0, False, scale=scale)
        o_d, lse_d = forward(q, kd, vd, 0.0, True, scale=scale)
        lse = torch.logaddexp(lse_p, lse_d)
        out = (o_p.to(lse.dtype) * (lse_p - lse).exp().unsqueeze(-1)
               + o_d.to(lse.dtype) * (lse_d - lse).exp().unsqueeze(-1)).to(q.dtype)
        ctx.save_for_backward(q, kp, vp, kd, vd, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _, backward = _cpu_flash_ops()
        q, kp, vp, kd, vd, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq_p, dk_p, dv_p = backward(grad_out, q, kp, vp, out, lse, 0.0, False, scale=ctx.scale)
        dq_d, dk_d, dv_d = backward(grad_out, q, kd, vd, out, lse, 0.0, True, scale=ctx.scale)
        return dq_p + dq_d, torch.cat([dk_p, dk_d], 2), torch.cat([dv_p, dv_d], 2), None


def bottom_right_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """``[l, h, d]`` queries over ``[s, hkv, d]`` keys (``s >= l``), the last query seeing every
    key, without an ``l x s`` mask (CPU: :class:`PrefixCausalAttention`; CUDA: torch's
    lower-right causal bias; elsewhere, or a torch without the CPU ops, a materialised mask)."""
    L, S = q.shape[0], k.shape[0]
    qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
    if S == L:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                             enable_gqa=kh.shape[1] != qh.shape[1])
    elif q.device.type == "cpu" and _cpu_flash_ops() is not None:
        out = PrefixCausalAttention.apply(qh, kh, vh, scale)
    elif q.device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right

        hq = qh.shape[1]  # the fused kernels behind the bias take no grouped K/V
        out = F.scaled_dot_product_attention(qh, repeat_kv(kh, hq, 1), repeat_kv(vh, hq, 1),
                                             attn_mask=causal_lower_right(L, S), scale=scale)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=_band(L, S, None, q.device),
                                             scale=scale, enable_gqa=kh.shape[1] != qh.shape[1])
    return out.squeeze(0).transpose(0, 1)


def _band(queries: int, keys: int, window: Optional[int], device) -> torch.Tensor:
    """``[l, s]`` bool, bottom-right aligned: query ``i`` is at key position ``s - l + i``."""
    qpos = torch.arange(keys - queries, keys, device=device)[:, None]
    diff = qpos - torch.arange(keys, device=device)[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


def sdpa_cp_attention(q, k, v, segments, scale: float, window: Optional[int] = None):
    """The ``sdpa`` backend at CP > 1: one call per piece (see the module docstring). With a
    sliding window a piece's keys start at most ``W - 1`` before its first query, so its banded
    mask is at most ``l x (l + W - 1)``."""
    outs = []
    for p in segments.cp_pieces:
        qd, kd, vd = q[p.q_start:p.q_end], k[p.k_start:p.k_end], v[p.k_start:p.k_end]
        if window is not None:
            mask = _band(p.queries, p.keys, window, q.device)
            qh, kh, vh = _heads_first(qd), _heads_first(kd), _heads_first(vd)
            gqa = kh.shape[1] != qh.shape[1]
            if gqa and q.device.type != "cpu":  # as at CP1: not every CUDA kernel takes GQA
                kh, vh = repeat_kv(kh, qh.shape[1], 1), repeat_kv(vh, qh.shape[1], 1)
                gqa = False
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                                 enable_gqa=gqa)
            outs.append(out.squeeze(0).transpose(0, 1))
        else:
            outs.append(bottom_right_causal(qd, kd, vd, scale))
    return torch.cat(outs, 0)


def cp_varlen_inputs(segments, device):
    """``(cu_seqlens_q, cu_seqlens_k, key_index, max_q, max_k)`` on ``device``, made once per
    micro-batch and kept on the segments (every layer reuses them)."""
    if segments.cp_varlen is None:
        layout = varlen_layout(segments.cp_pieces)
        segments.cp_varlen = (
            torch.tensor(layout.cu_seqlens_q, dtype=torch.int32, device=device),
            torch.tensor(layout.cu_seqlens_k, dtype=torch.int32, device=device),
            layout.key_index.to(device), layout.max_q, layout.max_k)
    return segments.cp_varlen


def cp_flex_mask_mod(segments, window: Optional[int], device):
    """The ``mask_mod`` of the ``flex`` backend at CP > 1 and its ``(Q_LEN, KV_LEN)``: local query
    ``q_idx`` is global token ``cp_query_index[q_idx]``; keys are every token in CP1 order."""
    doc = document_ids(segments.bounds).to(device)
    qpos = segments.cp_query_index.reshape(-1).to(device)

    def document_causal(b, h, q_idx, kv_idx):
        gq = qpos[q_idx]
        allowed = (doc[gq] == doc[kv_idx]) & (kv_idx <= gq)
        if window is not None:
            allowed = allowed & (gq - kv_idx < window)
        return allowed

    return document_causal, qpos.numel(), segments.bounds[-1]


def simulate_context_parallel(kernel, q, k, v, segments_for_rank, cp: int, scale: float,
                              window: Optional[int] = None) -> torch.Tensor:
    """Run ``kernel`` as each of ``cp`` ranks would, in one process, and put the outputs back in
    CP1 order: what ``tests/gpu`` and the unit tests compare with full attention.

    ``q, k, v`` are the whole micro-batch ``[t, h, d]`` (CP1 order); ``segments_for_rank(r)``
    gives rank ``r``'s segments (``cp_query_index`` says which tokens are its queries). Rank
    ``r`` runs its queries against all of ``k`` and ``v``, as after the all-gather.
    """
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    for rank in range(cp):
        segments = segments_for_rank(rank)
        index = segments.cp_query_index.reshape(-1).to(q.device)
        out[index] = kernel(q[index], k, v, segments, scale, window)
    return out
