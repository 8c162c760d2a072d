"""Pure pieces of training: packed attention masks, loss reduction, data positions."""

import pytest
import torch

from megatron.sft.model.attention import (
    packed_attention_mask,
    segment_ids,
    segments_from_cu_seqlens,
)
from megatron.sft.training.batch import masked_loss_sum, microbatch_rows, valid_cu_seqlens


def test_segment_ids_and_padding_segment():
    assert segment_ids(torch.tensor([[0, 3, 5, -1]]), 6).tolist() == [[0, 0, 0, 1, 1, 2]]
    assert segment_ids(torch.tensor([[0, 4]]), 4).tolist() == [[0, 0, 0, 0]]
    assert valid_cu_seqlens(torch.tensor([0, 3, 7, -1])).tolist() == [0, 3, 7]


def test_packed_mask_is_block_diagonal_causal():
    mask = packed_attention_mask(torch.tensor([[0, 2, 5]]), 5)[0, 0]
    allowed = (~mask).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]


def test_packed_mask_brute_force():
    cu = torch.tensor([[0, 3, 4, 9, -1], [0, 9, -1, -1, -1]])
    mask = packed_attention_mask(cu, 10)
    for b in range(2):
        bounds = valid_cu_seqlens(cu[b]).tolist()
        owner = [max(i for i, s in enumerate(bounds) if s <= q) for q in range(10)]
        for q in range(10):
            for k in range(10):
                assert bool(mask[b, 0, q, k]) == (not (k <= q and owner[q] == owner[k]))


def test_masked_loss_sum():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    total, count = masked_loss_sum(loss, mask)
    assert total.item() == 10.0 and count.item() == 3


@pytest.mark.parametrize("dp, mbs", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 1)])
def test_microbatch_rows_cover_each_global_batch_once(dp, mbs):
    gbs = 8
    for it in range(3):
        rows = [r for rank in range(dp)
                for micro in microbatch_rows(it, gbs, mbs, rank, dp) for r in micro]
        assert sorted(rows) == list(range(it * gbs, (it + 1) * gbs))
        assert all(len(m) == mbs for rank in range(dp) for m in microbatch_rows(it, gbs, mbs, rank, dp))


def test_documented_example():
    assert microbatch_rows(1, 4, 1, 0, 2) == [[4], [5]]
    assert microbatch_rows(1, 4, 1, 1, 2) == [[6], [7]]


def test_flattened_boundaries_agree_with_the_mask():
    cu = torch.tensor([[0, 3, 5, -1], [0, 6, -1, -1]])
    flat = torch.tensor(segments_from_cu_seqlens(cu, 2, 6))
    assert flat.tolist() == [0, 3, 5, 6, 12]
    # Same isolation as the block-diagonal mask: segment ids along the flattened sequence.
    seg = segment_ids(cu, 6)
    flat_seg = torch.bucketize(torch.arange(12), flat[1:-1].long(), right=True)
    for a in range(12):
        for b in range(12):
            same_row = a // 6 == b // 6
            same_mask_segment = same_row and seg[a // 6, a % 6] == seg[b // 6, b % 6]
            assert (flat_seg[a] == flat_seg[b]).item() == same_mask_segment


def test_sliding_window_mask_brute_force():
    cu = torch.tensor([[0, 6, 9, -1]])
    mask = packed_attention_mask(cu, 10, window=3)[0, 0]
    owner = [0] * 6 + [1] * 3 + [2]
    for q in range(10):
        for k in range(10):
            allowed = k <= q and q - k < 3 and owner[q] == owner[k]
            assert bool(mask[q, k]) == (not allowed), (q, k)
