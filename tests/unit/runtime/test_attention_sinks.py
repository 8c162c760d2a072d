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
