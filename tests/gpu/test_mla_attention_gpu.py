"""Multi-latent attention's head dims on every registered packed kernel on CUDA (``varlen``,
``flex``, ``sdpa``): q/k head dim 192 (DeepSeek-V3's 128 nope + 64 rope), v head dim 128, MLA's
YaRN softmax scale, on packed documents, forward and backward in bf16, against the dense masked
softmax computed in fp32 from the same inputs (tolerance as in test_attention_backends_gpu.py).
Skipped without CUDA; tests/unit/runtime/test_mla_attention.py covers sdpa on CPU."""

import math

import pytest
import torch

from megatron.sft.model.attention import (
    attention_backends,
    dense_reference_attention,
    document_segments,
    get_attention_backend,
)
from megatron.sft.model.attention.mla import mla_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: DeepSeek-V3: mscale_all_dim 1, factor 40 -> (0.1 ln 40 + 1)^2 / sqrt(192)
SCALE = (0.1 * math.log(40) + 1) ** 2 / math.sqrt(192)
CU = [[0, 1, 200, 512], [0, 300, 512, -1]]


def _run(kernel, heads=16):
    seg = document_segments(torch.tensor(CU), len(CU), 512, torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(seg.bounds[-1], heads, d, generator=gen, device="cuda",
                           dtype=torch.bfloat16).requires_grad_() for d in (192, 192, 128))
    out = (dense_reference_attention(q, k, v, seg.bounds, SCALE) if kernel is None
           else mla_attention(kernel, q, k, v, seg, SCALE))
    assert out.shape == (seg.bounds[-1], heads, 128)
    weights = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)
    (out.float() * weights).sum().backward()
    return out.float(), [x.grad.float() for x in (q, k, v)]


@pytest.mark.parametrize("backend", [s.name for s in attention_backends() if s.kernel is not None])
def test_mla_head_dims_equal_dense(backend):
    spec = get_attention_backend(backend)
    missing = spec.check("local", "cuda")
    if missing:
        pytest.skip(missing)
    out, grads = _run(spec.kernel)
    ref_out, ref_grads = _run(None)
    for got, ref in [(out, ref_out)] + list(zip(grads, ref_grads)):
        assert torch.allclose(got, ref, atol=2e-2, rtol=2e-2), (backend, (got - ref).abs().max())
