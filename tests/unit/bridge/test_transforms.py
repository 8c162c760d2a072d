"""QKV / gate-up / vocab math against hand-computed layouts."""

import pytest
import torch

from megatron.sft.bridge import transforms as T


def test_fuse_qkv_matches_the_documented_layout():
    # 4 query heads, 2 KV groups, head_dim 1, hidden 1: rows are labelled by value.
    q = torch.tensor([[0.], [1.], [2.], [3.]])
    k = torch.tensor([[10.], [11.]])
    v = torch.tensor([[20.], [21.]])
    fused = T.fuse_qkv(q, k, v, num_query_groups=2)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    rank0, rank1 = T.split_tp(fused, 2, 0)
    assert rank0.flatten().tolist() == [0, 1, 10, 20]
    assert rank1.flatten().tolist() == [2, 3, 11, 21]


@pytest.mark.parametrize("heads, groups, head_dim", [(4, 2, 3), (8, 8, 2), (6, 1, 4), (12, 4, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_roundtrip(heads, groups, head_dim, bias):
    hidden = 7
    shape = (lambda n: (n * head_dim,)) if bias else (lambda n: (n * head_dim, hidden))
    q, k, v = (torch.randn(shape(n)) for n in (heads, groups, groups))
    fused = T.fuse_qkv(q, k, v, groups)
    assert fused.shape[0] == (heads + 2 * groups) * head_dim
    for got, want in zip(T.unfuse_qkv(fused, heads, groups, head_dim), (q, k, v)):
        assert torch.equal(got, want)


def test_qkv_each_tp_rank_holds_whole_groups():
    heads, groups, d = 8, 4, 2
    q = torch.arange(heads * d).float().unsqueeze(1)
    k = 100 + torch.arange(groups * d).float().unsqueeze(1)
    v = 200 + torch.arange(groups * d).float().unsqueeze(1)
    shards = T.split_tp(T.fuse_qkv(q, k, v, groups), 2, 0)
    # rank 1 gets groups 2 and 3: query heads 4..7, key/value heads 2..3
    r1 = shards[1].flatten().tolist()
    assert r1[:4] == [8, 9, 10, 11] and r1[4:6] == [104, 105] and r1[6:8] == [204, 205]


def test_gate_up_is_fused_per_rank():
    gate = torch.tensor([[0.], [1.], [2.], [3.]])
    up = torch.tensor([[10.], [11.], [12.], [13.]])
    shards = T.fuse_gate_up(gate, up, 2)
    assert [s.flatten().tolist() for s in shards] == [[0, 1, 10, 11], [2, 3, 12, 13]]
    g, u = T.unfuse_gate_up(shards)
    assert torch.equal(g, gate) and torch.equal(u, up)


def test_vocab_padding():
    assert T.padded_vocab_size(151936, 128, 1) == 151936
    assert T.padded_vocab_size(151936, 128, 2) == 152064
    assert T.padded_vocab_size(301, 128, 2) == 512
    w = torch.ones(5, 3)
    p = T.pad_vocab(w, 8)
    assert p.shape == (8, 3) and torch.equal(p[:5], w) and p[5:].abs().sum() == 0
    with pytest.raises(ValueError, match="cannot pad"):
        T.pad_vocab(w, 4)


def test_transforms_run_on_meta_tensors():
    q, k, v = (torch.empty(n, 16, device="meta") for n in (8, 4, 4))
    fused = T.fuse_qkv(q, k, v, 2)
    assert fused.is_meta and fused.shape == (16, 16)


def test_split_rejects_indivisible():
    with pytest.raises(ValueError, match="not divisible by tensor-parallel size 3"):
        T.split_tp(torch.zeros(4, 2), 3, 0)
