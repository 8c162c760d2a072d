"""The chunked output layer + cross-entropy on one process: the same loss and gradients as
today's logits -> fp32 -> padded-vocabulary mask -> cross-entropy path (fp64, fp32, bf16, a
frozen weight), and at s = 8192, vocabulary 32000 no tensor within 4x of the logits' size in
forward + backward (the probe of the attention test). TP2, SP, PP and CP are
``tests/integration/training/test_context_parallel_training.py``."""

import pytest
import torch

from megatron.sft.training.chunked_loss import (
    ChunkedVocabParallelCrossEntropy,
    chunk_tokens,
    defer_output_layer,
    use_chunked_loss,
)
from sft_testing import LargestTensor as _LargestTensor


def _unchunked(hidden, weight, labels, mask, vocab):
    """Today's path on one rank (training/loss.py): logits in the model dtype, fp32, padded
    rows at the fp32 minimum, cross-entropy, masked sum."""
    logits = (hidden @ weight.t()).float().clone()
    logits[:, vocab:] = torch.finfo(torch.float32).min
    per_token = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    return (per_token * mask).sum()


def _inputs(n=37, h=16, padded=56, vocab=50, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(padded, h, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    mask = (torch.rand(n, generator=gen) > 0.3).float()
    return hidden, weight, labels, mask, vocab


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5),
                                        (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_chunked_equals_unchunked_loss_and_gradients(dtype, tol, chunk):
    hidden, weight, labels, mask, vocab = _inputs(dtype=dtype)
    ref = _unchunked(hidden, weight, labels, mask, vocab)
    ref_grads = torch.autograd.grad(ref * 0.5, (hidden, weight))
    got = ChunkedVocabParallelCrossEntropy.apply(hidden, weight, labels, mask, vocab, 0, None,
                                                 chunk)
    grads = torch.autograd.grad(got * 0.5, (hidden, weight))  # a scaled loss, as grad scaling
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) <= 1e-6 * ref.item()
    for a, b in zip(grads, ref_grads):
        assert a.dtype == b.dtype and (a.float() - b.float()).abs().max() <= tol * max(
            1.0, b.float().abs().max().item())
    # the padded rows never get a gradient
    assert grads[1][vocab:].abs().max() == 0


def test_frozen_weight_gets_no_gradient_work():
    hidden, weight, labels, mask, vocab = _inputs()
    weight = weight.detach()  # LoRA: the output layer is frozen
    got = ChunkedVocabParallelCrossEntropy.apply(hidden, weight, labels, mask, vocab, 0, None, 5)
    (dh,) = torch.autograd.grad(got, (hidden,))
    (ref,) = torch.autograd.grad(_unchunked(hidden, weight, labels, mask, vocab), (hidden,))
    assert (dh - ref).abs().max() < 1e-5


def test_no_gradient_work_without_grad_mode():
    """Evaluation runs one matmul per chunk (the logits), training three (+ dH, dW)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten.mm.default
            return func(*args, **(kwargs or {}))

    hidden, weight, labels, mask, vocab = _inputs()  # 37 tokens: 8 chunks of 5
    counts = {}
    for grad in (False, True):
        with CountMatmuls() as probe, torch.set_grad_enabled(grad):
            got = ChunkedVocabParallelCrossEntropy.apply(hidden, weight, labels, mask, vocab, 0,
                                                         None, 5, torch.is_grad_enabled())
        counts[grad] = probe.count
        assert abs(got.item() - _unchunked(hidden, weight, labels, mask, vocab).item()) < 1e-4
    assert counts == {False: 8, True: 24}


def test_largest_tensor_at_8192_tokens_and_32000_vocab_is_over_4x_smaller():
    s, vocab, h = 8192, 32000, 16
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (s,), generator=gen)
    mask = torch.ones(s)
    hidden = torch.randn(s, h, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, h, generator=gen, requires_grad=True)
    with _LargestTensor() as chunked:
        loss = ChunkedVocabParallelCrossEntropy.apply(hidden, weight, labels, mask, vocab, 0,
                                                      None, chunk_tokens(vocab))
        loss.backward()
    # today's path, on the meta device (shapes only: it would allocate GBs)
    meta = [t.detach().to("meta").requires_grad_(t.requires_grad) for t in (hidden, weight)]
    with _LargestTensor() as unchunked:
        _unchunked(meta[0], meta[1], labels.to("meta"), mask.to("meta"), vocab).backward()
    assert unchunked.largest >= s * vocab
    ratio = unchunked.largest / chunked.largest
    assert ratio >= 4, (unchunked.largest, chunked.largest)
    print(f"largest tensor: unchunked {unchunked.largest:,} elements, chunked "
          f"{chunked.largest:,} ({ratio:.1f}x smaller)")


def test_when_it_is_on_and_the_output_layer_it_defers():
    assert use_chunked_loss("auto", 16384, 151936, 1) and not use_chunked_loss("auto", 256, 512, 1)
    assert use_chunked_loss("on", 1, 1, 1) and not use_chunked_loss("off", 10 ** 6, 10 ** 6, 1)
    assert chunk_tokens(151936) == 220 and chunk_tokens(10 ** 9) == 1

    class Model(torch.nn.Module):
        def __init__(self, bias):
            super().__init__()
            self.output_layer = torch.nn.Linear(4, 6, bias=bias)

    m = Model(bias=False)
    x = torch.randn(3, 4)
    defer_output_layer([m])
    out, bias = m.output_layer(x, weight=None, runtime_gather_output=None)
    assert out is x and bias is None and set(m.state_dict()) == {"output_layer.weight"}
    with pytest.raises(ValueError, match="has a bias; use --chunked-loss off"):
        defer_output_layer([Model(bias=True)])
