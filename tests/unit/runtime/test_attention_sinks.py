"""Learnable attention sinks on packed rows against a hand-written softmax whose denominator
holds the sink logit: values and gradients (q, k, v and the sinks), across document
boundaries, with and without a sliding window, at CP1 and context parallelism simulated rank by
rank (the all-gather CP path's pieces); flex's forward runs on CPU too."""

import math

import pytest
import torch

from megatron.sft.model.attention import document_segments, segments_from_cu_seqlens, sinks
from megatron.sft.model.context_parallel.kernels import simulate_context_parallel

CPU = torch.device("cpu")
S = 24
#: documents crossing the CP chunks of both ranks, a 1-token document, padding
CU = torch.tensor([[0, 13, 14, 20, -1], [0, 4, 24, -1, -1]])


def reference(q, k, v, bounds, scale, window, sink):
    """A softmax over [every key's score (-inf where the document, causality or the window
    forbid it)..., sink[h]], the sink's column then dropped (its value is zero)."""
    t, hq, _ = q.shape
    kr, vr = (x.repeat_interleave(hq // k.shape[1], dim=1) for x in (k, v))
    doc = torch.zeros(t, dtype=torch.long)
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        doc[a:b] = n
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (doc[:, None] == doc[None, :]) & (j <= i) & ((i - j < window) if window else True)
    scores = torch.einsum("ihd,jhd->hij", q, kr) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    logits = torch.cat([scores, sink.view(hq, 1, 1).expand(hq, t, 1).to(scores.dtype)], -1)
    p = torch.softmax(logits, -1)[..., :-1]
    return torch.einsum("hij,jhd->ihd", p, vr)


def _inputs(seed=0, hq=4, hkv=2, d=8):
    gen = torch.Generator().manual_seed(seed)
    t = 2 * S
    q, k, v = (torch.randn(t, h, d, generator=gen, dtype=torch.float64).requires_grad_()
               for h in (hq, hkv, hkv))
    sink = (torch.randn(hq, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    return q, k, v, sink


def _grads(out, tensors, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * g).sum(), tensors)


def test_apply_sinks_is_one_more_softmax_column():
    scores = torch.tensor([[0.3, -1.2, 2.0]])  # one query, three keys, one head
    v = torch.randn(3, 5)
    sink = torch.tensor([0.7])
    lse = torch.logsumexp(scores, -1)
    out = (torch.softmax(scores, -1) @ v).view(1, 1, 5)
    expected = torch.softmax(torch.cat([scores, sink.view(1, 1)], -1), -1)[:, :3] @ v
    got = sinks.apply_sinks(out, lse.view(1, 1), sink)
    torch.testing.assert_close(got.view(1, 5), expected, rtol=1e-6, atol=1e-6)
    assert math.isclose(torch.sigmoid(lse - sink).item(),
                        1 - torch.softmax(torch.cat([scores[0], sink]), 0)[-1].item(), rel_tol=1e-6)


@pytest.mark.parametrize("window", [None, 5])
def test_sdpa_sinks_equal_the_reference_across_documents(window):
    q, k, v, sink = _inputs()
    bounds = segments_from_cu_seqlens(CU, 2, S)
    seg = document_segments(CU, 2, S, CPU)
    out = sinks.sink_kernel("sdpa", 1)(q, k, v, seg, 0.3, window, sink)
    ref = reference(q, k, v, bounds, 0.3, window, sink)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(_grads(out, (q, k, v, sink)), _grads(ref, (q, k, v, sink))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cp", [2, 3])
@pytest.mark.parametrize("window", [None, 5])
def test_sdpa_sinks_under_context_parallelism_equal_the_reference(cp, window):
    s = 2 * cp * 4  # rows cut into 2·CP chunks; documents cross them
    cu = torch.tensor([[0, 9, 10, -1], [0, 3, s, -1]])
    q, k, v, sink = (x[:2 * s].detach().requires_grad_() for x in _inputs(seed=2))
    sink = _inputs(seed=2)[3]
    bounds = segments_from_cu_seqlens(cu, 2, s)
    # segments built without the window (GPT-OSS: windowed and full layers share them)
    kernel = sinks.sink_kernel("sdpa", cp)
    out = simulate_context_parallel(
        lambda *a: kernel(*a, sink), q, k, v,
        lambda r: document_segments(cu, 2, s, CPU, cp_size=cp, cp_rank=r), cp, 0.3, window)
    ref = reference(q, k, v, bounds, 0.3, window, sink)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(_grads(out, (q, k, v, sink)), _grads(ref, (q, k, v, sink))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_flex_sinks_forward_on_cpu():
    pytest.importorskip("torch.nn.attention.flex_attention")
    window = 5
    q, k, v, sink = (x.detach().float() for x in _inputs(seed=3))
    seg = document_segments(CU, 2, S, CPU)
    out = sinks.sink_kernel("flex", 1)(q, k, v, seg, 0.3, window, sink)
    ref = reference(q, k, v, segments_from_cu_seqlens(CU, 2, S), 0.3, window, sink)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # a second window on the same micro-batch gets its own block mask, not the first one's
    other = None
    out2 = sinks.sink_kernel("flex", 1)(q, k, v, seg, 0.3, other, sink)
    ref2 = reference(q, k, v, segments_from_cu_seqlens(CU, 2, S), 0.3, other, sink)
    torch.testing.assert_close(out2, ref2, rtol=1e-4, atol=1e-5)


def test_varlen_in_fp32_runs_sdpas_exact_path():
    q, k, v, sink = _inputs(seed=4)
    seg = document_segments(CU, 2, S, CPU)
    out = sinks.sink_kernel("varlen", 1)(q, k, v, seg, 0.3, 5, sink)
    ref = reference(q, k, v, segments_from_cu_seqlens(CU, 2, S), 0.3, 5, sink)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["te", "dense"])
def test_backends_without_sinks_are_refused(backend):
    with pytest.raises(ValueError, match=f"--attention-backend {backend} has no learnable "
                                         "attention sinks.*use --attention-backend sdpa"):
        sinks.check_sink_backend(backend)


class _Schema:
    """What ``sinks._call`` reads of an op: its argument names."""

    def __init__(self, names):
        self.arguments = [type("Arg", (), {"name": n, "has_default_value": lambda self: True})()
                          for n in names]
        self.name = "fake"


def _flash_pair():
    """A flash kernel's contract written out in torch (varlen, causal, bottom-right): forward
    ``(out, lse [h, t], rng)``; backward recomputes ``P = exp(S - lse)`` and uses
    ``D = rowsum(dO * out)`` from the ``out`` and ``lse`` it is given, as flash does."""
    def scores(q, k, cu_q, cu_k, scale, window, a):
        (qa, qb), (ka, kb) = (cu_q[a].item(), cu_q[a + 1].item()), (cu_k[a].item(),
                                                                     cu_k[a + 1].item())
        s = torch.einsum("qhd,khd->hqk", q[qa:qb], k[ka:kb]) * scale
        i = torch.arange(qb - qa)[:, None] + (kb - ka) - (qb - qa)
        j = torch.arange(kb - ka)[None, :]
        ok = (j <= i) & ((i - j <= window[0]) if window[0] >= 0 else True)
        return s.masked_fill(~ok, float("-inf")), (qa, qb, ka, kb)

    def forward(query, key, value, cu_seq_q, cu_seq_k, scale, window_size, **_):
        out, lse = torch.zeros_like(query), torch.zeros(query.shape[1], query.shape[0],
                                                        dtype=query.dtype)
        for a in range(len(cu_seq_q) - 1):
            s, (qa, qb, ka, kb) = scores(query, key, cu_seq_q, cu_seq_k, scale, window_size, a)
            lse[:, qa:qb] = torch.logsumexp(s, -1)
            out[qa:qb] = torch.einsum("hqk,khd->qhd", s.softmax(-1), value[ka:kb])
        return out, lse, torch.zeros(2)

    def backward(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, scale,
                 window_size, **_):
        dq, dk, dv = (torch.zeros_like(x) for x in (query, key, value))
        for a in range(len(cu_seq_q) - 1):
            s, (qa, qb, ka, kb) = scores(query, key, cu_seq_q, cu_seq_k, scale, window_size, a)
            p = torch.exp(s - lse[:, qa:qb, None])
            go = grad_out[qa:qb]
            dv[ka:kb] += torch.einsum("hqk,qhd->khd", p, go)
            dp = torch.einsum("qhd,khd->hqk", go, value[ka:kb])
            ds = p * (dp - (go * out[qa:qb]).sum(-1).transpose(0, 1)[..., None])
            dq[qa:qb] += torch.einsum("hqk,khd->qhd", ds, key[ka:kb]) * scale
            dk[ka:kb] += torch.einsum("hqk,qhd->khd", ds, query[qa:qb]) * scale
        return dq, dk, dv

    names = ("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal",
             "scale", "window_size", "enable_gqa", "grad_out", "out", "lse", "rng_state")
    fwd = type("Op", (), {"_schema": _Schema(names),
                          "__call__": lambda self, **kw: forward(**kw)})()
    bwd = type("Op", (), {"_schema": _Schema(names),
                          "__call__": lambda self, **kw: backward(**kw)})()
    return fwd, bwd


@pytest.mark.parametrize("cp", [1, 2])
@pytest.mark.parametrize("window", [None, 5])
def test_flash_backward_with_the_sinked_out_and_lse_is_exact(monkeypatch, cp, window):
    """``LseKernelWithSink`` (the varlen path) on a flash kernel written out in torch: values
    and gradients of q, k, v and the sinks equal the softmax with the sink column, at CP1 and
    CP2 (its pieces as varlen sequences), with and without a window."""
    monkeypatch.setattr(sinks, "_varlen_ops", _flash_pair)
    q, k, v, sink = _inputs(seed=5, hq=4, hkv=4)  # the fake kernel takes no grouped K/V
    bounds = segments_from_cu_seqlens(CU, 2, S)
    monkeypatch.setattr(sinks, "_FLASH_DTYPES", (torch.float64,))  # the fake kernel is fp64
    if cp == 1:
        out = sinks.varlen_sink_attention(q, k, v, document_segments(CU, 2, S, CPU), 0.3,
                                          window, sink)
    else:
        out = simulate_context_parallel(
            lambda *a: sinks.varlen_sink_attention(*a, sink), q, k, v,
            lambda r: document_segments(CU, 2, S, CPU, cp_size=2, cp_rank=r), 2, 0.3, window)
    ref = reference(q, k, v, bounds, 0.3, window, sink)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(_grads(out, (q, k, v, sink)), _grads(ref, (q, k, v, sink))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
