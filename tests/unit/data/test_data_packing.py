"""Packing maths: worked examples by hand, then properties with hypothesis."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron.sft.data.packing import (
    assemble_pack,
    cu_seqlens_for,
    pack_best_fit,
    packing_efficiency,
    position_ids_for,
    shift_sample,
)


def test_worked_examples():
    assert position_ids_for([3, 2]).tolist() == [0, 1, 2, 0, 1]
    assert cu_seqlens_for([3, 2]).tolist() == [0, 3, 5]
    tokens, labels, mask = shift_sample(np.array([5, 6, 7]), np.array([0, 1, 1]))
    assert (tokens.tolist(), labels.tolist(), mask.tolist()) == ([5, 6], [6, 7], [1, 1])
    assert [p.tolist() for p in pack_best_fit(np.array([5, 3, 4, 2]), capacity=7)] == [[0, 3], [2, 1]]
    assert packing_efficiency([7, 5], 8) == 0.75


def test_assemble_pack_module_docstring_example():
    a, b = (np.array([10, 11, 12, 13]), np.array([0, 0, 1, 1])), (np.array([20, 21, 22]), np.array([0, 1, 1]))
    row = assemble_pack([a, b], seq_length=7, pad_id=99)
    assert row["tokens"].tolist() == [10, 11, 12, 20, 21, 99, 99]
    assert row["labels"].tolist() == [11, 12, 13, 21, 22, 99, 99]
    assert row["loss_mask"].tolist() == [0, 1, 1, 1, 1, 0, 0]
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1]
    assert row["cu_seqlens"].tolist() == [0, 3, 5, 7]
    full = assemble_pack([a], seq_length=3, pad_id=0)
    assert full["cu_seqlens"].tolist() == [0, 3]  # no padding segment when the row is full
    with pytest.raises(ValueError, match="seq_length"):
        assemble_pack([a, b], seq_length=4, pad_id=0)


def test_oversized_item_is_an_error_that_names_it():
    with pytest.raises(ValueError, match="item 1 has size 9 > capacity 8"):
        pack_best_fit(np.array([3, 9]), capacity=8)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 64), min_size=1, max_size=200),
    capacity=st.integers(64, 200),
    window=st.integers(1, 80),
    seed=st.integers(0, 2**16),
)
def test_every_item_packed_exactly_once_within_capacity_and_deterministic(sizes, capacity, window, seed):
    sizes = np.array(sizes)
    packs = pack_best_fit(sizes, capacity, window, np.random.default_rng(seed))
    flat = np.concatenate(packs)
    assert sorted(flat.tolist()) == list(range(len(sizes)))
    assert all(sizes[p].sum() <= capacity for p in packs)
    again = pack_best_fit(sizes, capacity, window, np.random.default_rng(seed))
    assert [p.tolist() for p in again] == [p.tolist() for p in packs]
    # best fit never leaves two bins of one window that could have been merged... at most one
    # bin per window is at most half full (otherwise the later item would have fit the earlier bin)
    if window >= len(sizes):
        assert sum(sizes[p].sum() * 2 <= capacity for p in packs) <= 1


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 40), min_size=1, max_size=8),
    extra=st.integers(0, 30),
    seed=st.integers(0, 1000),
)
def test_rows_keep_samples_intact_isolated_and_aligned(lengths, extra, seed):
    rng = np.random.default_rng(seed)
    samples = [(rng.integers(3, 1000, n), rng.integers(0, 2, n)) for n in lengths]
    seq_length = sum(n - 1 for n in lengths) + extra
    row = assemble_pack(samples, seq_length, pad_id=0)
    assert all(len(v) == seq_length for k, v in row.items() if k != "cu_seqlens")
    cu = row["cu_seqlens"]
    assert cu[0] == 0 and cu[-1] == seq_length and np.all(np.diff(cu) > 0)
    for i, (ids, mask) in enumerate(samples):  # each sample intact inside its own window
        s, e = cu[i], cu[i + 1]
        assert row["tokens"][s:e].tolist() == ids[:-1].tolist()
        assert row["labels"][s:e].tolist() == ids[1:].tolist()
        assert row["loss_mask"][s:e].tolist() == mask[1:].tolist()  # aligned to labels
        assert row["position_ids"][s:e].tolist() == list(range(e - s))
    # position ids restart exactly at the boundaries: no attention window crosses one
    starts = np.flatnonzero(row["position_ids"] == 0)
    assert starts.tolist() == cu[:-1].tolist()
    used = sum(n - 1 for n in lengths)
    assert not row["loss_mask"][used:].any()


def test_efficiency_on_a_realistic_sft_length_distribution():
    """Most samples a few hundred tokens (log-normal, median ~350), 3% long tail up to 4096."""
    rng = np.random.default_rng(0)
    n = 20_000
    lengths = np.clip(rng.lognormal(np.log(350), 0.8, n).astype(int) + 20, 2, 4097)
    tail = rng.random(n) < 0.03
    lengths[tail] = rng.integers(2000, 4097, int(tail.sum()))
    packs = pack_best_fit(lengths - 1, 4096, window=4096, rng=rng)
    efficiency = packing_efficiency([(lengths[p] - 1).sum() for p in packs], 4096)
    assert efficiency >= 0.97, efficiency
    padded = packing_efficiency(lengths - 1, 4096)  # one sample per row, for comparison
    assert padded < 0.2
