"""Learnable attention sinks (GPT-OSS's ``self_attn.sinks``) on packed rows, for the ``sdpa``,
``varlen`` and ``flex`` backends, at CP1 and with the all-gather context parallelism.

A sink is one more logit ``s_h`` per head in every query's softmax, whose value is zero: it only
takes probability mass away from the real keys. With ``lse_i = log sum_j exp(x_ij)`` over the keys
query ``i`` may see (its document, its window)::

    out'_i = sum_j exp(x_ij) v_j / (exp(lse_i) + exp(s_h)) = out_i * sigmoid(lse_i - s_h)

so any kernel that returns its log-sum-exp gets sinks by one multiply, and the document mask,
the sliding window and the CP pieces stay the kernel's business. Example, one head, one query
with scores ``[0, 0]`` and sink ``0``: ``lse = log 2``, the weights become ``[1/3, 1/3]``
(``sigmoid(log 2) = 2/3`` times ``[1/2, 1/2]``).

Per backend:

- ``sdpa``: each document (CP: each piece) as one masked softmax in plain torch, which gives
  ``lse`` and its gradient. Exact on CPU and GPU; it materialises the document's (piece's)
  ``h x l x s`` scores, so on GPU prefer ``flex`` or ``varlen``.
- ``flex``: ``flex_attention`` with its log-sum-exp returned (differentiable in torch's flex).
- ``varlen``: torch's varlen flash forward and backward ops in :class:`LseKernelWithSink`. The
  sink is a zero-valued softmax column, so the flash backward given the *sinked* output and the
  *sinked* log-sum-exp ``logaddexp(lse, s)`` is already the exact backward of the sinked
  attention (probabilities ``exp(x - lse')``, ``D = dO . out'``); ``d s_h = -sum_i
  exp(s_h - lse'_i) (dO_i . out'_i)``.

``te`` and ``dense`` (megatron-core's modules) have no sinks on packed rows: refused by
:func:`check_sink_backend` before the model is built.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Optional

import torch

from megatron.sft.model.attention.segments import banded_causal_mask
from megatron.sft.model.heads import repeat_kv


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """``out [t, h, d] * sigmoid(lse [t, h] - sinks [h])`` (fp32 weights, ``out``'s dtype back).

    >>> o = torch.ones(1, 1, 2)
    >>> apply_sinks(o, torch.tensor([[math.log(2)]]), torch.zeros(1)).tolist()
    [[[0.6666666865348816, 0.6666666865348816]]]
    """
    dtype = torch.promote_types(out.dtype, torch.float32)
    weight = torch.sigmoid(lse.to(dtype) - sinks.to(dtype).view(1, -1))
    return (out.to(dtype) * weight.unsqueeze(-1)).to(out.dtype)


# --------------------------------------------------------------------------------- sdpa
def masked_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         allowed: torch.Tensor, scale: float):
    """``q [l, hq, d]`` over ``k, v [s, hkv, d]`` where ``allowed [l, s]``: ``(out [l, hq, d],
    lse [l, hq])``, in fp32 at least, differentiable (plain torch)."""
    hq = q.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    kr, vr = repeat_kv(k, hq).to(dtype), repeat_kv(v, hq).to(dtype)
    scores = torch.einsum("qhd,khd->hqk", q.to(dtype), kr) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)  # [h, l]; every query sees itself, so finite
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.einsum("hqk,khd->qhd", probs, vr), lse.transpose(0, 1)


def sdpa_sink_attention(q, k, v, segments, scale: float, window: Optional[int],
                        sinks: torch.Tensor) -> torch.Tensor:
    """``sdpa`` with sinks at CP1: one masked softmax per document."""
    outs = []
    for start, end in zip(segments.bounds[:-1], segments.bounds[1:]):
        allowed = banded_causal_mask(end - start, window, q.device)
        out, lse = masked_attention_lse(q[start:end], k[start:end], v[start:end], allowed, scale)
        outs.append(apply_sinks(out, lse, sinks).to(q.dtype))
    return torch.cat(outs, 0)


def sdpa_cp_sink_attention(q, k, v, segments, scale: float, window: Optional[int],
                           sinks: torch.Tensor) -> torch.Tensor:
    """``sdpa`` with sinks at CP > 1: one masked softmax per piece (its causal band aligned to
    the bottom-right corner, as ``context_parallel.kernels``)."""
    from megatron.sft.model.context_parallel.kernels import _band

    outs = []
    for p in segments.cp_pieces:
        allowed = _band(p.queries, p.keys, window, q.device)
        out, lse = masked_attention_lse(q[p.q_start:p.q_end], k[p.k_start:p.k_end],
                                        v[p.k_start:p.k_end], allowed, scale)
        outs.append(apply_sinks(out, lse, sinks).to(q.dtype))
    return torch.cat(outs, 0)


# --------------------------------------------------------------------------------- flex
def _flex_with_lse(qh, kh, vh, block_mask, scale: float):
    """``flex_attention`` returning ``(out, lse)`` whichever way this torch spells it
    (``return_aux=AuxRequest(lse=True)`` in new releases, ``return_lse=True`` before)."""
    from torch.nn.attention import flex_attention as fa

    from megatron.sft.model.attention.backends import _compiled_flex, _eager_flex

    flex = _compiled_flex() if qh.device.type == "cuda" else _eager_flex()
    gqa = qh.shape[1] != kh.shape[1]
    if "return_aux" in inspect.signature(fa.flex_attention).parameters:
        out, aux = flex(qh, kh, vh, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                        return_aux=fa.AuxRequest(lse=True))
        return out, aux.lse
    return flex(qh, kh, vh, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                return_lse=True)


def flex_sink_attention(q, k, v, segments, scale: float, window: Optional[int],
                        sinks: torch.Tensor) -> torch.Tensor:
    """``flex`` with sinks, CP1 and CP > 1 (the block mask is the backend's own)."""
    from megatron.sft.model.attention.backends import flex_block_mask

    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, t, d]
    out, lse = _flex_with_lse(qh, kh, vh, flex_block_mask(segments, window, q.device), scale)
    return apply_sinks(out.squeeze(0).transpose(0, 1), lse.squeeze(0).transpose(0, 1), sinks)


# --------------------------------------------------------------------------------- varlen
@functools.lru_cache(maxsize=None)
def _varlen_ops():
    """torch's varlen flash forward/backward ops (``torch.ops.torch_attn``), ``None`` when this
    torch lacks them (private ops: checked, never assumed)."""
    try:
        import torch.nn.attention.varlen  # noqa: F401  (registers the ops)

        ns = torch.ops.torch_attn
        return ns._varlen_attn.default, ns._varlen_attn_backward.default
    except (ImportError, AttributeError, RuntimeError):
        return None


def _call(op, values: dict):
    """``op`` called with the arguments its schema names, from ``values``."""
    args = {}
    for a in op._schema.arguments:
        if a.name in values:
            args[a.name] = values[a.name]
        elif not a.has_default_value():
            raise NotImplementedError(f"{op._schema.name} wants {a.name!r}")
    return op(**args)


class LseKernelWithSink(torch.autograd.Function):
    """A flash kernel's ``(out, lse)`` forward and ``(dO, q, k, v, out, lse) -> dq, dk, dv``
    backward, made into attention with sinks (why the flash backward is exact here: the module
    docstring). ``lse`` layout ``[h, t]`` (flash's varlen layout)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, values):
        forward, _ = _varlen_ops()
        result = _call(forward, dict(values, query=q, key=k, value=v))
        out, lse, rng = result[0], result[1], result[2]
        heads_first = lse.shape[0] == q.shape[1] and lse.shape[1] == q.shape[0]
        dtype = torch.promote_types(lse.dtype, torch.float32)
        s = sinks.to(dtype).view(-1, 1) if heads_first else sinks.to(dtype).view(1, -1)
        lse2 = torch.logaddexp(lse.to(dtype), s)
        w = torch.exp(lse.to(dtype) - lse2)
        w = w.transpose(0, 1) if heads_first else w
        out2 = (out.to(dtype) * w.unsqueeze(-1)).to(out.dtype)
        lse2 = lse2.to(lse.dtype)
        ctx.save_for_backward(q, k, v, sinks, out2, lse2, rng)
        ctx.values, ctx.heads_first = values, heads_first
        return out2

    @staticmethod
    def backward(ctx, grad):
        _, backward = _varlen_ops()
        q, k, v, sinks, out2, lse2, rng = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk, dv = _call(backward, dict(ctx.values, grad_out=grad, query=q, key=k, value=v,
                                          out=out2, lse=lse2, rng_state=rng))
        dtype = torch.promote_types(lse2.dtype, torch.float32)
        lse_t = lse2.to(dtype).transpose(0, 1) if ctx.heads_first else lse2.to(dtype)  # [t, h]
        p_sink = torch.exp(sinks.to(dtype).view(1, -1) - lse_t)
        dsink = -(p_sink * (grad.to(dtype) * out2.to(dtype)).sum(-1)).sum(0)
        return dq, dk, dv, dsink.to(sinks.dtype), None


#: what the flash kernels take; other dtypes (fp32 parity runs) use ``sdpa``'s exact path
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def varlen_sink_attention(q, k, v, segments, scale: float, window: Optional[int],
                          sinks: torch.Tensor) -> torch.Tensor:
    """``varlen`` with sinks, CP1 and CP > 1 (half precision; fp32 runs use ``sdpa``'s)."""
    from megatron.sft.model.context_parallel import kernels as cp_kernels

    if q.dtype not in _FLASH_DTYPES or _varlen_ops() is None:
        kernel = sdpa_cp_sink_attention if segments.cp_size > 1 else sdpa_sink_attention
        return kernel(q, k, v, segments, scale, window, sinks)
    if segments.cp_size > 1:
        cu_q, cu_k, key_index, max_q, max_k = cp_kernels.cp_varlen_inputs(segments, q.device)
        k, v = k.index_select(0, key_index), v.index_select(0, key_index)
    else:
        cu_q = cu_k = segments.cu_seqlens_q
        max_q = max_k = segments.max_document_length
    names = {a.name for a in _varlen_ops()[0]._schema.arguments}
    if window is not None and "window_size" not in names:
        raise ValueError(f"torch {torch.__version__}'s varlen attention has no window_size; "
                         "use --attention-backend flex for GPT-OSS's sliding windows")
    if "enable_gqa" not in names:
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    # as torch's own varlen_attn: causal is window (-1, 0); a window (W - 1, 0) is causal too
    values = dict(cu_seq_q=cu_q, cu_seq_k=cu_k, max_q=max_q, max_k=max_k,
                  is_causal=window is None,
                  scale=scale, window_size=[window - 1 if window else -1, 0],
                  enable_gqa=k.shape[1] != q.shape[1], seqused_k=None, block_table=None,
                  num_splits=None)
    return LseKernelWithSink.apply(q, k, v, sinks, values)


# --------------------------------------------------------------------------------- choice
#: backend -> (CP1 kernel, CP > 1 kernel), each ``(q, k, v, segments, scale, window, sinks)``
SINK_KERNELS: dict[str, tuple[Callable, Callable]] = {
    "sdpa": (sdpa_sink_attention, sdpa_cp_sink_attention),
    "varlen": (varlen_sink_attention, varlen_sink_attention),
    "flex": (flex_sink_attention, flex_sink_attention),
}


def check_sink_backend(backend: str) -> None:
    """Refuse a backend without sinks on packed rows, naming the ones that have them."""
    if backend not in SINK_KERNELS:
        raise ValueError(f"--attention-backend {backend} has no learnable attention sinks "
                         f"(this model's self_attn.sinks); use --attention-backend "
                         f"{' or '.join(SINK_KERNELS)}")


def sink_kernel(backend: str, cp_size: int) -> Callable:
    check_sink_backend(backend)
    if backend == "varlen" and _varlen_ops() is None:
        raise ValueError(f"torch {torch.__version__} has no varlen flash ops "
                         "(torch.ops.torch_attn) for attention sinks; use --attention-backend "
                         "flex")
    return SINK_KERNELS[backend][1 if cp_size > 1 else 0]
