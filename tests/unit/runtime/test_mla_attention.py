"""Multi-latent attention's core attention (``model/attention/mla.py``) on CPU: q/k head dim
!= v head dim through the ``sdpa`` kernel at CP1 and through its CP kernel simulated at CP2 and
CP4 equals the dense masked softmax (float64, forward and backward), on packed rows with a
document longer than a chunk, a 1-token document and padding; megatron-core's MLA layer builds
with it on the local spec (it could not: its DotProductAttention takes no k/v channels)."""

import types

import pytest
import torch

from megatron.sft.model.attention import dense_reference_attention, document_segments, \
    get_attention_backend, segments_from_cu_seqlens
from megatron.sft.model.attention.mla import MLACoreAttention, mla_attention
from megatron.sft.model.context_parallel import kernels as cp_kernels

S = 48
CU = torch.tensor([[0, 30, 31, 44, -1], [0, 5, 45, 48, -1]])
CPU = torch.device("cpu")


def _qkv(t, heads=3, dk=24, dv=12):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(t, heads, d, generator=gen, dtype=torch.float64).requires_grad_()
            for d in (dk, dk, dv)]


def _check(got, ref, inputs):
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-12
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, inputs, g), torch.autograd.grad(got, inputs, g)):
        assert (a - b).abs().max() < 1e-12


def test_sdpa_with_mla_head_dims_equals_dense():
    q, k, v = _qkv(2 * S)
    seg = document_segments(CU, 2, S, CPU)
    ref = dense_reference_attention(q, k, v, seg.bounds, 0.3)
    _check(mla_attention(get_attention_backend("sdpa").kernel, q, k, v, seg, 0.3), ref,
           (q, k, v))


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_kernel_with_mla_head_dims_equals_dense(cp):
    q, k, v = _qkv(2 * S)
    ref = dense_reference_attention(q, k, v, segments_from_cu_seqlens(CU, 2, S), 0.3)

    def kernel(qr, kk, vv, segments, scale, window):
        return mla_attention(cp_kernels.sdpa_cp_attention, qr, kk, vv, segments, scale, window)

    got = cp_kernels.simulate_context_parallel(
        kernel, q, k, v, lambda r: document_segments(CU, 2, S, CPU, cp_size=cp, cp_rank=r),
        cp, 0.3)
    _check(got, ref, (q, k, v))


def test_core_attention_module_takes_mla_keywords_and_returns_v_dims():
    config = types.SimpleNamespace(context_parallel_size=1, attention_dropout=0.0,
                                   kv_channels=12)
    core = MLACoreAttention(config, 1, None, "self", softmax_scale=0.3, k_channels=24,
                            v_channels=12, backend="sdpa")
    q, k, v = _qkv(2 * S)
    seg = document_segments(CU, 2, S, CPU)
    as_sbhd = [x.detach().reshape(2, S, 3, -1).transpose(0, 1) for x in (q, k, v)]
    out = core(*as_sbhd, packed_seq_params=seg)  # [s, b, h * dv]
    ref = dense_reference_attention(q, k, v, seg.bounds, 0.3).detach()
    assert out.shape == (S, 2, 3 * 12)
    assert (out.transpose(0, 1).reshape(2 * S, 3, 12) - ref).abs().max() < 1e-12
    with pytest.raises(ValueError, match="v head dim 30 > q/k head dim 24"):
        MLACoreAttention.pad_value(torch.zeros(1, 30), 24)
