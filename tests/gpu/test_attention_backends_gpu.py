"""GPU attention backends (every registered packed kernel: ``varlen``, ``flex``, ``sdpa``, ...
on CUDA) equal the dense masked softmax on packed documents, forward and backward, in
fp32-accumulated bf16.

Tolerance (bf16 inputs): the fused kernels accumulate in fp32 but round q/k/v and the output
to bf16 (8 bits of mantissa, relative step 2^-8 ~ 3.9e-3), so outputs and gradients are compared
to the reference computed from the same bf16 inputs in fp32, with |diff| <= 2e-2 + 2e-2 |ref|,
a few bf16 steps. Skipped without CUDA; CPU CI covers sdpa and dense in tests/unit/runtime.
"""

import pytest
import torch

from megatron.sft.model.attention import (
    attention_backends,
    dense_reference_attention,
    document_segments,
    get_attention_backend,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: (collate_sft-style cu_seqlens of 2 rows of 512, hq, hkv, window): a 1-token document, uneven
#: ones, a document filling its row, a row ending in padding
CASES = [
    ([[0, 1, 200, 512], [0, 512, -1, -1]], 8, 2, None),
    ([[0, 300, 301, 488], [0, 512, -1, -1]], 8, 8, None),
    ([[0, 1, 200, 450], [0, 512, -1, -1]], 8, 1, 64),
]


def _inputs(t, hq, hkv, d=64, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(t, h, d, generator=gen, device="cuda", dtype=torch.bfloat16)
            .requires_grad_() for h in (hq, hkv, hkv)]


def _run(kernel, cu, hq, hkv, window):
    """``kernel`` takes DocumentSegments (registered kernels); None = the dense reference."""
    seg = document_segments(torch.tensor(cu), len(cu), 512, torch.device("cuda"))
    q, k, v = _inputs(seg.bounds[-1], hq, hkv)
    if kernel is None:
        out = dense_reference_attention(q, k, v, seg.bounds, 0.125, window)
    else:
        out = kernel(q, k, v, seg, 0.125, window)
    weights = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)
    (out.float() * weights).sum().backward()
    return out.float(), [x.grad.float() for x in (q, k, v)]


@pytest.mark.parametrize("cu, hq, hkv, window", CASES)
@pytest.mark.parametrize("backend", [s.name for s in attention_backends() if s.kernel is not None])
def test_backend_equals_dense(backend, cu, hq, hkv, window):
    spec = get_attention_backend(backend)
    missing = spec.check("local", "cuda")  # e.g. this torch has no varlen
    if missing:
        pytest.skip(missing)
    out, grads = _run(spec.kernel, cu, hq, hkv, window)
    ref_out, ref_grads = _run(None, cu, hq, hkv, window)
    for got, ref in [(out, ref_out)] + list(zip(grads, ref_grads)):
        assert torch.allclose(got, ref, atol=2e-2, rtol=2e-2), (backend, (got - ref).abs().max())
