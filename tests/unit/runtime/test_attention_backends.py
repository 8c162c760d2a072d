"""Core-attention backends on CPU against a hand-written masked softmax, and the promise that no
backend but ``dense`` creates an s x s tensor."""

import pytest
import torch

from megatron.sft.model.attention import (
    banded_causal_mask,
    dense_reference_attention,
    document_segments,
    sdpa_attention,
    segments_from_cu_seqlens,
)
from megatron.sft.model.layer_impl import LayerImplError, resolve_layer_impl
from sft_testing import LargestTensor


def _qkv(t, hq, hkv, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t, h, d, generator=gen, dtype=torch.float64, requires_grad=True)
            for h in (hq, hkv, hkv)]


def _by_hand(q, k, v, bounds, scale, window):
    """Softmax over allowed keys, one query at a time (no shared code with the backends)."""
    out = torch.zeros_like(q)
    group = q.shape[1] // k.shape[1]
    for a, b in zip(bounds[:-1], bounds[1:]):
        for i in range(a, b):
            lo = a if window is None else max(a, i - window + 1)
            for h in range(q.shape[1]):
                scores = (k[lo:i + 1, h // group] @ q[i, h]) * scale
                out[i, h] = scores.softmax(0) @ v[lo:i + 1, h // group]
    return out


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("window", [None, 3])
def test_sdpa_and_dense_reference_equal_the_hand_computation(hq, hkv, window):
    bounds = (0, 1, 7, 9, 16, 32)  # a 1-token document, uneven ones, a long one
    q, k, v = _qkv(32, hq, hkv)
    expected = _by_hand(q, k, v, bounds, 0.3, window)
    for backend in (sdpa_attention, dense_reference_attention):
        got = backend(q, k, v, bounds, 0.3, window)
        assert torch.allclose(got, expected, atol=1e-12), backend.__name__


@pytest.mark.parametrize("window", [None, 5])
def test_sdpa_gradients_equal_the_dense_reference(window):
    bounds = (0, 1, 17, 40, 64)
    grads = []
    for backend in (sdpa_attention, dense_reference_attention):
        q, k, v = _qkv(64, 4, 2, seed=1)
        out = backend(q, k, v, bounds, 0.25, window)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([x.grad for x in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12)


def test_documents_never_see_each_other():
    # Changing one document's keys/values must not change any other document's output.
    bounds = (0, 5, 6, 20)
    q, k, v = _qkv(20, 2, 2)
    base = sdpa_attention(q, k, v, bounds, 0.5)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[6:20] += 10.0
    v2[6:20] -= 10.0
    moved = sdpa_attention(q, k2, v2, bounds, 0.5)
    assert torch.equal(moved[:6], base[:6]) and not torch.allclose(moved[6:], base[6:])


def test_flattened_segments_and_window_mask():
    cu = torch.tensor([[0, 3, 5, -1], [0, 6, -1, -1]])
    assert segments_from_cu_seqlens(cu, 2, 6) == (0, 3, 5, 6, 12)
    seg = document_segments(cu, 2, 6, torch.device("cpu"))
    assert seg.cu_seqlens_q.tolist() == [0, 3, 5, 6, 12] and seg.max_document_length == 6
    assert seg.qkv_format == "sbhd" and seg.max_seqlen_q == 6  # megatron-core's RoPE length
    allowed = banded_causal_mask(5, 2)
    assert all(bool(allowed[i, j]) == (0 <= i - j < 2) for i in range(5) for j in range(5))


_LargestTensor = LargestTensor  # the probe, shared with the CP and chunked-loss tests


@pytest.mark.parametrize("backend, bounds", [
    ("sdpa", (0, 4096)),                         # one document fills the row
    ("sdpa", (0, 1, 1000, 2500, 4000, 4096)),   # packed, uneven
])
def test_no_s_squared_tensor_at_4096(backend, bounds):
    from megatron.sft.model.attention import PackedCoreAttention

    s, heads, d = 4096, 2, 16

    class Config:
        context_parallel_size = 1
        attention_dropout = 0.0
        kv_channels = d

    module = PackedCoreAttention(Config(), 1, None, "self", backend=backend)
    segments = document_segments(torch.tensor([list(bounds)]), 1, s, torch.device("cpu"))
    q, k, v = (torch.randn(s, 1, heads, d, requires_grad=True) for _ in range(3))
    with _LargestTensor() as probe:
        out = module(q, k, v, packed_seq_params=segments)
        out.sum().backward()
    assert out.shape == (s, 1, heads * d)
    assert probe.largest < s * s // 8, probe.largest  # far below s^2 = 16.8M elements
    # The probe does catch an s x s tensor: the dense reference materialises heads x s x s.
    with _LargestTensor() as probe:
        dense_reference_attention(q[:, 0], k[:, 0], v[:, 0], bounds, 0.25)
    assert probe.largest >= s * s


def test_factory_errors_name_the_alternative():
    assert resolve_layer_impl("local", "auto", "cpu").attention == "sdpa"
    assert resolve_layer_impl("local", "dense", "cpu").attention == "dense"
    with pytest.raises(LayerImplError, match="CUDA only.*--attention-backend sdpa"):
        resolve_layer_impl("local", "varlen", "cpu")
    with pytest.raises(LayerImplError, match="flex runs on CUDA only"):
        resolve_layer_impl("local", "flex", "cpu")
    with pytest.raises(LayerImplError, match="needs Transformer Engine layers"):
        resolve_layer_impl("local", "te", "cpu")
    with pytest.raises(LayerImplError, match="use one of auto, te, varlen"):
        resolve_layer_impl("local", "flash", "cpu")
