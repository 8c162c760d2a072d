"""Learnable attention sinks (GPT-OSS) on CUDA: every packed backend with sinks (``sdpa``,
``varlen``, ``flex``) equals a dense softmax with the sink logit in its denominator, forward and
backward (q, k, v and the sinks), in bf16, on packed documents with and without a sliding
window, at CP1 and at CP2 simulated rank by rank (the all-gather path's pieces).

Tolerance as tests/gpu/test_attention_backends_gpu.py: the reference is computed in fp32 from
the same bf16 inputs, ``|diff| <= 2e-2 + 2e-2 |ref|``. Skipped without CUDA; the CPU tests
(tests/unit/runtime/test_attention_sinks.py) hold fp64 to 1e-10.
"""

import pytest
import torch

from megatron.sft.model.attention import document_segments, get_attention_backend, sinks
from megatron.sft.model.context_parallel.kernels import simulate_context_parallel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

S = 512
#: a 1-token document, uneven ones crossing CP2's chunks (128 tokens), a full row, padding
CU = [[0, 1, 200, 450], [0, 512, -1, -1]]


def _reference(q, k, v, bounds, scale, window, sink):
    t, hq, _ = q.shape
    kr, vr = (x.float().repeat_interleave(hq // k.shape[1], dim=1) for x in (k, v))
    doc = torch.zeros(t, dtype=torch.long, device=q.device)
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        doc[a:b] = n
    i = torch.arange(t, device=q.device)[:, None]
    j = torch.arange(t, device=q.device)[None, :]
    allowed = (doc[:, None] == doc[None, :]) & (j <= i) & ((i - j < window) if window else True)
    scores = torch.einsum("ihd,jhd->hij", q.float(), kr) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    column = sink.float().view(hq, 1, 1).expand(hq, t, 1)
    p = torch.softmax(torch.cat([scores, column], -1), -1)[..., :-1]
    return torch.einsum("hij,jhd->ihd", p, vr)


def _inputs(t, hq=8, hkv=2, d=64):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(t, h, d, generator=gen, device="cuda", dtype=torch.bfloat16)
               .requires_grad_() for h in (hq, hkv, hkv))
    sink = (torch.randn(hq, generator=gen, device="cuda") * 2).to(torch.bfloat16) \
        .requires_grad_()
    return q, k, v, sink


def _backward(out, tensors):
    weights = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)
    return torch.autograd.grad((out.float() * weights).sum(), tensors)


@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("cp", [1, 2])
@pytest.mark.parametrize("backend", list(sinks.SINK_KERNELS))
def test_sinks_equal_the_dense_softmax_with_a_sink_column(backend, cp, window):
    missing = get_attention_backend(backend).check("local", "cuda", cp)
    if missing:
        pytest.skip(missing)
    cu = torch.tensor(CU)
    seg = document_segments(cu, 2, S, torch.device("cuda"))
    q, k, v, sink = _inputs(seg.bounds[-1])
    kernel = sinks.sink_kernel(backend, cp)
    if cp == 1:
        out = kernel(q, k, v, seg, 0.125, window, sink)
    else:
        out = simulate_context_parallel(
            lambda *a: kernel(*a, sink), q, k, v,
            lambda r: document_segments(cu, 2, S, torch.device("cuda"), cp_size=cp,
                                        cp_rank=r), cp, 0.125, window)
    ref = _reference(q, k, v, seg.bounds, 0.125, window, sink)
    got_grads = _backward(out, (q, k, v, sink))
    ref_grads = _backward(ref, (q, k, v, sink))
    for name, got, want in [("out", out, ref)] + list(zip("qkvs", got_grads, ref_grads)):
        got, want = got.float(), want.float()
        tol = 2e-2 + 2e-2 * want.abs()
        if name == "s":  # a sum over every token of a head: compare relative to its size
            tol = 2e-2 * want.abs().max().clamp(min=1.0)
        assert ((got - want).abs() <= tol).all(), (backend, cp, window, name,
                                                   (got - want).abs().max().item())
