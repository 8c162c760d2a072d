"""Context parallelism's math in one process, no process group: the chunk split is
megatron-core's RoPE slicing, the all-gather order restores the row, every rank's pieces see
exactly the keys full attention lets them see, and CP attention simulated rank by rank equals
full attention (values and gradients) for sdpa; varlen's and flex's bookkeeping (the same pieces)
is checked on CPU with a reference varlen and flex's eager forward."""

import pytest
import torch

from megatron.sft.model.context_parallel import kernels as cp_kernels, split as cp_split
from megatron.sft.model.attention import (
    attention_backends,
    dense_reference_attention,
    document_segments,
    get_attention_backend,
    segments_from_cu_seqlens,
)
from megatron.sft.model.context_parallel.split import ContextParallelError, Piece
from megatron.sft.runtime.layout import FLAGS, SHORT, ParallelLayout

CPU = torch.device("cpu")
S = 48
#: a document longer than a chunk, a 1-token document, padding (row 0); a document spanning
#: the chunk pair of CP2's rank 1 ([12, 36)) and a row without padding (row 1)
CU = torch.tensor([[0, 30, 31, 44, -1], [0, 5, 45, 48, -1]])


def _segments(cp, window=None, cu=CU, rows=2, s=S):
    return lambda r: document_segments(cu, rows, s, CPU, cp_size=cp, cp_rank=r, window=window)


def _qkv(t, hq, hkv, d=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t, h, d, generator=gen, dtype=dtype).requires_grad_() for h in
            (hq, hkv, hkv)]


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_split_is_megatron_cores_rope_slicing(cp):
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    from megatron.sft.runtime.cpu_mode import _CudaToCpuMode

    class Group:  # what get_pos_emb_on_this_cp_rank reads of the CP group
        def __init__(self, rank):
            self._rank = rank

        def size(self):
            return cp

        def rank(self):
            return self._rank

    s = 2 * cp * 5
    table = torch.arange(s, dtype=torch.float32).view(s, 1, 1, 1)  # RoPE's [s, 1, 1, dim]
    seen = []
    for rank in range(cp):
        with _CudaToCpuMode():  # it pins memory and moves to "cuda"
            theirs = get_pos_emb_on_this_cp_rank(table, 0, Group(rank)).flatten().long()
        assert cp_split.row_positions(s, cp, rank).tolist() == theirs.tolist()
        seen += theirs.tolist()
    assert sorted(seen) == list(range(s))  # every position on exactly one rank
    gathered = torch.cat([cp_split.row_positions(s, cp, r) for r in range(cp)])
    assert gathered[cp_split.gather_order(s, cp)].tolist() == list(range(s))


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("window", [None, 5])
def test_pieces_see_exactly_what_full_attention_sees(cp, window):
    bounds = segments_from_cu_seqlens(CU, 2, S)
    doc = cp_split.document_ids(bounds)
    t = bounds[-1]
    pos = torch.arange(t)
    diff = pos[:, None] - pos[None, :]
    full = (doc[:, None] == doc[None, :]) & (diff >= 0) & (diff < (window or t))
    for rank in range(cp):
        pieces = cp_split.query_pieces(bounds, 2, S, cp, rank, window)
        index = cp_split.local_token_index(2, S, cp, rank).reshape(-1)
        mine = torch.zeros(index.numel(), t, dtype=torch.bool)
        assert pieces[0].q_start == 0 and pieces[-1].q_end == index.numel()
        for a, b in zip(pieces[:-1], pieces[1:]):
            assert a.q_end == b.q_start  # the pieces tile the local queries in order
        for p in pieces:
            assert p.keys >= p.queries
            assert len(set(doc[index[p.q_start:p.q_end]].tolist())) == 1  # one document each
            # bottom-right causal over the piece's keys (and the window, per query)
            for i in range(p.queries):
                last = p.k_end - p.queries + i
                assert index[p.q_start + i] == last
                first = p.k_start if window is None else max(p.k_start, last - window + 1)
                mine[p.q_start + i, first:last + 1] = True
            if window is not None:  # the piece's keys start within the first query's window
                assert p.k_end - p.queries - p.k_start < window
        assert torch.equal(mine, full[index]), rank


def test_split_examples_and_errors():
    assert cp_split.local_token_index(2, 8, 2, 0).tolist() == [[0, 1, 6, 7], [8, 9, 14, 15]]
    # one row of 8, documents [0, 5) [5, 8): rank 1 holds chunks [2, 4) and [4, 6); a piece
    # never crosses a chunk or a document
    assert cp_split.query_pieces((0, 5, 8), 1, 8, 2, 1) == (
        Piece(0, 2, 0, 4), Piece(2, 3, 0, 5), Piece(3, 4, 5, 6))
    with pytest.raises(ContextParallelError, match="use a --seq-length divisible by 4"):
        cp_split.row_positions(10, 2, 0)
    # the layout's check, in the trainer's words and the tools'
    layout = ParallelLayout(tp=2, cp=2)
    [msg] = layout.sequence_problems(100, True, FLAGS)
    assert "--seq-length 100 is not divisible by 2 x --context-parallel-size 2 x " \
        "--tensor-model-parallel-size 2 (--sequence-parallel) = 8" in msg
    assert msg.endswith("use --seq-length 104 or --seq-length 96")
    assert layout.sequence_problems(100, True, SHORT)[0].startswith(
        "SEQ_LEN=100 is not divisible by 2 x CP=2 x TP=2 (SP) = 8")
    assert layout.sequence_problems(96, True) == [] == layout.sequence_problems(100)
    assert ParallelLayout(cp=2).sequence_problems(102) == [
        "SEQ_LEN=102 is not divisible by 2 x CP=2 = 4 (each row is cut into 2 x CP chunks); "
        "use SEQ_LEN=104 or SEQ_LEN=100"]
    assert ParallelLayout(tp=2).sequence_problems(100) == []  # no CP, no SP: any length


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("hq, hkv", [(4, 2), (2, 2)])
def test_sdpa_simulated_cp_equals_full_attention(cp, window, hq, hkv):
    bounds = segments_from_cu_seqlens(CU, 2, S)
    q, k, v = _qkv(2 * S, hq, hkv)
    ref = dense_reference_attention(q, k, v, bounds, 0.3, window)
    got = cp_kernels.simulate_context_parallel(cp_kernels.sdpa_cp_attention, q, k, v,
                                               _segments(cp, window), cp, 0.3, window)
    assert (got - ref).abs().max() < 1e-12
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), g), torch.autograd.grad(got, (q, k, v), g)):
        assert (a - b).abs().max() < 1e-12


def test_prefix_causal_merge_in_bf16_and_without_a_queries_x_keys_tensor():
    from sft_testing import LargestTensor as _LargestTensor

    # bf16 (fp32 log-sum-exp merge) within bf16 rounding of the fp32 reference
    q, k, v = _qkv(64, 4, 2, dtype=torch.float32, seed=3)
    ref = dense_reference_attention(q, k, v, (0, 64), 0.25)[40:]
    got = cp_kernels.bottom_right_causal(q[40:].bfloat16(), k.bfloat16(), v.bfloat16(), 0.25)
    assert (got.float() - ref).abs().max() < 2e-2
    # CP2 of one 4096-token document: rank 0's second chunk (1024 queries) sees all 4096 keys
    s, heads, d = 4096, 2, 16
    segments = document_segments(torch.tensor([[0, s]]), 1, s, CPU, cp_size=2, cp_rank=0)
    q, k, v = (torch.randn(t, heads, d, requires_grad=True) for t in (s // 2, s, s))
    with _LargestTensor() as probe:
        out = cp_kernels.sdpa_cp_attention(q, k, v, segments, 0.25)
        out.sum().backward()
    assert probe.largest < s * s // 8, probe.largest


def _varlen_reference(q, k, v, cu_q, cu_k, scale):
    """What flash varlen computes: per sequence, causal aligned to the bottom-right corner."""
    outs = []
    for (qa, qb), (ka, kb) in zip(zip(cu_q[:-1], cu_q[1:]), zip(cu_k[:-1], cu_k[1:])):
        outs.append(cp_kernels.bottom_right_causal(q[qa:qb], k[ka:kb], v[ka:kb], scale))
    return torch.cat(outs)


@pytest.mark.parametrize("cp", [2, 4])
def test_varlen_and_flex_bookkeeping_give_full_attention(cp):
    bounds = segments_from_cu_seqlens(CU, 2, S)
    q, k, v = _qkv(2 * S, 4, 2, dtype=torch.float32)
    ref = dense_reference_attention(q, k, v, bounds, 0.3)

    def varlen(q_, k_, v_, segments, scale, window):
        cu_q, cu_k, key_index, _, _ = cp_kernels.cp_varlen_inputs(segments, q_.device)
        return _varlen_reference(q_, k_[key_index], v_[key_index], cu_q.tolist(),
                                 cu_k.tolist(), scale)

    got = cp_kernels.simulate_context_parallel(varlen, q, k, v, _segments(cp), cp, 0.3)
    assert (got - ref).abs().max() < 1e-5
    # flex's mask over (local queries, every key), evaluated by flex's own eager forward
    # (the CPU has no flex backward; the GPU test runs it compiled, with gradients)
    flex = get_attention_backend("flex").cp_kernel
    q, k, v = (x.detach() for x in (q, k, v))
    got = cp_kernels.simulate_context_parallel(flex, q, k, v, _segments(cp), cp, 0.3)
    assert (got - ref).abs().max() < 1e-5


def test_transformer_engine_layout_pads_documents_and_splits_each():
    bounds = (0, 3, 8, 9)
    seen = []
    for rank in range(2):
        layout = cp_split.thd_layout(bounds, 2, rank)
        assert layout.cu_seqlens == (0, 3, 8, 9) and layout.cu_seqlens_padded == (0, 4, 12, 16)
        assert layout.index.shape == (1, 8)  # 16 padded tokens / CP 2
        seen += [i for i in layout.index.flatten().tolist() if i >= 0]
    assert sorted(seen) == list(range(9))
    assert cp_split.thd_layout(bounds, 2, 1).index.tolist() == [[1, 2, 5, 6, 7, -1, -1, -1]]
    tokens = torch.arange(100, 109).view(1, 9)
    assert cp_split.take_tokens(tokens, torch.tensor([[0, -1, 8]])).tolist() == [[100, 0, 108]]


@pytest.mark.parametrize("name", [s.name for s in attention_backends() if s.supports_cp])
@pytest.mark.parametrize("cp", [2, 4])
def test_every_cp_backend_cuts_the_batch_into_the_ranks_tokens(name, cp):
    """Every registered backend with context parallelism gives each rank tokens of equal
    count that together are the micro-batch, each once (padding aside)."""
    spec = get_attention_backend(name)
    cuts = [spec.attention_inputs(CU, 2, S, None, cp_size=cp, cp_rank=r).local_index
            for r in range(cp)]
    assert len({tuple(c.shape) for c in cuts}) == 1
    tokens = sorted(i for c in cuts for i in c.flatten().tolist() if i >= 0)
    assert tokens == list(range(2 * S))
