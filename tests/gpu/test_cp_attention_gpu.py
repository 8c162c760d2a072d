"""Context-parallel attention on one GPU: every CP-capable packed backend (``varlen``, ``flex``,
``sdpa`` on CUDA) runs each simulated CP rank's queries against the whole micro-batch's K/V (what
the all-gather hands it), and the ranks' outputs put back in row order equal full attention,
forward and backward, in bf16. One GPU cannot run CP > 1 over NCCL; the all-gather itself is
tested on CPU under gloo (tests/integration/training/test_context_parallel_training.py), and
the pieces every backend reads are tested on CPU
(tests/unit/runtime/test_context_parallel_math.py).

Tolerance (bf16 inputs), as tests/gpu/test_attention_backends_gpu.py: the reference is the
dense masked softmax computed in fp32 from the same bf16 inputs; outputs and q/k/v gradients
must agree within |diff| <= 2e-2 + 2e-2 |ref| (a few bf16 steps of 2^-8). Skipped without CUDA.

Also here: the chunked loss on CUDA in bf16 equals the unchunked one (same tolerance for the
gradients, 1e-3 relative for the loss).
"""

import pytest
import torch

from megatron.sft.model.context_parallel import kernels as cp_kernels
from megatron.sft.model.attention import (
    attention_backends,
    dense_reference_attention,
    document_segments,
    get_attention_backend,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

S = 512
#: 2 rows of 512 (collate_sft-style cu_seqlens), hq, hkv, window: a 1-token document, a
#: document over many chunks, a row-filling document, padding; a sliding window
CASES = [
    ([[0, 1, 200, 512], [0, 512, -1, -1]], 8, 2, None),
    ([[0, 300, 301, 488], [0, 40, 470, 512]], 8, 8, None),
    ([[0, 1, 200, 450], [0, 512, -1, -1]], 8, 1, 64),
]
CP_BACKENDS = [s.name for s in attention_backends() if s.cp_kernel is not None]


def _inputs(t, hq, hkv, d=64, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(t, h, d, generator=gen, device="cuda", dtype=torch.bfloat16)
            .requires_grad_() for h in (hq, hkv, hkv)]


def _backward(out, inputs):
    weights = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)
    (out.float() * weights).sum().backward()
    return out.float(), [x.grad.float() for x in inputs]


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("cu, hq, hkv, window", CASES)
@pytest.mark.parametrize("backend", CP_BACKENDS)
def test_simulated_cp_ranks_equal_full_attention(backend, cu, hq, hkv, window, cp):
    spec = get_attention_backend(backend)
    missing = spec.check("local", "cuda", cp)
    if missing:
        pytest.skip(missing)
    cu_t = torch.tensor(cu)
    rows = len(cu)

    def segments(rank):
        return document_segments(cu_t, rows, S, torch.device("cuda"), cp_size=cp,
                                 cp_rank=rank, window=window)

    full = document_segments(cu_t, rows, S, torch.device("cuda"))
    q, k, v = _inputs(rows * S, hq, hkv)
    try:
        out = cp_kernels.simulate_context_parallel(spec.cp_kernel, q, k, v, segments, cp, 0.125,
                                                   window)
    except ValueError as e:  # e.g. this torch's varlen_attn has no window_size
        pytest.skip(str(e))
    got, grads = _backward(out, (q, k, v))
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref, ref_grads = _backward(dense_reference_attention(q2, k2, v2, full.bounds, 0.125, window),
                               (q2, k2, v2))
    for name, a, b in [("out", got, ref)] + list(zip("qkv", grads, ref_grads)):
        assert torch.allclose(a, b, atol=2e-2, rtol=2e-2), (backend, cp, name,
                                                            (a - b).abs().max().item())


def test_chunked_loss_on_cuda_in_bf16():
    from megatron.sft.training.chunked_loss import ChunkedVocabParallelCrossEntropy

    gen = torch.Generator(device="cuda").manual_seed(0)
    n, h, padded, vocab = 4096, 256, 8192, 8000
    hidden = torch.randn(n, h, generator=gen, device="cuda").bfloat16().requires_grad_()
    weight = (torch.randn(padded, h, generator=gen, device="cuda") * 0.05).bfloat16() \
        .requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen, device="cuda")
    mask = (torch.rand(n, generator=gen, device="cuda") > 0.3).float()
    logits = (hidden @ weight.t()).float().clone()
    logits[:, vocab:] = torch.finfo(torch.float32).min
    ref = (torch.nn.functional.cross_entropy(logits, labels, reduction="none") * mask).sum()
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    got = ChunkedVocabParallelCrossEntropy.apply(hidden, weight, labels, mask, vocab, 0, None,
                                                 512)
    grads = torch.autograd.grad(got, (hidden, weight))
    assert abs(got.item() - ref.item()) <= 1e-3 * ref.item()
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2), \
            (a.float() - b.float()).abs().max().item()
