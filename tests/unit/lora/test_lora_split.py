"""LoRA adapters between TP shards and the PEFT form, both ways (pure, no process group):
round trips at TP 1/2/4 (TP4 > the 2 KV heads), a hand-worked small example, agreement with
how training initialises adapters at each TP, and per-shard merges equal to the full update
split like the base weight."""

import dataclasses
import types

import pytest
import torch

from megatron.sft.bridge.architectures import shape_of
from megatron.sft.bridge.architectures.llama import LLAMA
from megatron.sft.bridge.rules import FusedGateUp, FusedQKV, ShardContext, TensorParallel
from megatron.sft.lora import split
from megatron.sft.lora.settings import LORA_TARGETS, PARENT, LoRASettings
from megatron.sft.runtime import parallel_dims
from megatron.sft.runtime.layout import ParallelLayout

R = 3


def adapter_to_hf(target, a, b, shape):
    return split.adapter_to_hf(split.target_names(LLAMA, target), a, b, shape)


def adapter_from_hf(target, peft, shape, tp):
    return split.adapter_from_hf(split.target_names(LLAMA, target), peft, shape, tp)


def _modules(target):
    return split.target_names(LLAMA, target).modules


def _shape():
    """hidden 64, 4 heads / 2 KV heads of 16, ffn 96: TP4 gives each KV head to 2 ranks."""
    return shape_of({"architectures": ["LlamaForCausalLM"], **LLAMA.tiny_config})[1]


def _hf_sizes(shape):
    """HF module -> (in, out) of its weight."""
    q, kv, h, f = shape.dim("q"), shape.dim("kv"), shape.hidden_size, shape.ffn_hidden_size
    return {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, f), "mlp.up_proj": (h, f),
            "mlp.down_proj": (f, h)}


def _random_peft(target, shape, seed=0):
    """One target's PEFT form; the fused parts share lora_A, as they do in Megatron."""
    g = torch.Generator().manual_seed(seed)
    modules = _modules(target)
    sizes = _hf_sizes(shape)
    a = torch.randn(R, sizes[modules[0]][0], generator=g, dtype=torch.float64)
    return {m: (a, torch.randn(sizes[m][1], R, generator=g, dtype=torch.float64))
            for m in modules}


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("target", list(LORA_TARGETS))
def test_split_then_export_is_the_identity(target, tp):
    shape = _shape()
    peft = _random_peft(target, shape)
    a_shards, b_shards = adapter_from_hf(target, peft, shape, tp)
    assert len(a_shards) == len(b_shards) == tp
    # Each rank's shapes are what LoRAAdapter allocates next to its base linear.
    qkv_rows = shape.dim("q") + 2 * shape.dim("kv")
    in_, out = {"linear_qkv": (64, qkv_rows), "linear_proj": (64, 64),
                "linear_fc1": (64, 2 * 96), "linear_fc2": (96, 64)}[target]
    column = LORA_TARGETS[target] == "column"
    assert tuple(a_shards[0].shape) == (R, in_ if column else in_ // tp)
    assert tuple(b_shards[0].shape) == (out // tp if column else out, R)
    back = adapter_to_hf(target, a_shards, b_shards, shape)
    assert list(back) == list(peft)
    for m, (a, b) in peft.items():
        assert torch.equal(back[m][0], a) and torch.equal(back[m][1], b), m


def test_hand_worked_split():
    """4 heads / 2 KV groups of head_dim 1, r = 1: rows labelled by value."""
    shape = dataclasses.replace(_shape(), hidden_size=2, head_dim=1, ffn_hidden_size=4)
    col = lambda *v: torch.tensor(v, dtype=torch.float32).reshape(-1, 1)  # noqa: E731
    a = torch.tensor([[7.0, 8.0]])
    qkv = {"self_attn.q_proj": (a, col(0, 1, 2, 3)), "self_attn.k_proj": (a, col(10, 11)),
           "self_attn.v_proj": (a, col(20, 21))}
    _, b = adapter_from_hf("linear_qkv", qkv, shape, 2)
    assert [s.flatten().tolist() for s in b] == [[0, 1, 10, 20], [2, 3, 11, 21]]
    _, b = adapter_from_hf("linear_qkv", qkv, shape, 4)  # TP > KV heads: fused rows split evenly
    assert [s.flatten().tolist() for s in b] == [[0, 1], [10, 20], [2, 3], [11, 21]]
    fc1 = {"mlp.gate_proj": (a, col(0, 1, 2, 3)), "mlp.up_proj": (a, col(10, 11, 12, 13))}
    a_shards, b = adapter_from_hf("linear_fc1", fc1, shape, 2)
    assert [s.flatten().tolist() for s in b] == [[0, 1, 10, 11], [2, 3, 12, 13]]
    assert all(torch.equal(s, a) for s in a_shards)
    down_a, down_b = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), col(5, 6)
    a_shards, b = adapter_from_hf("linear_fc2", {"mlp.down_proj": (down_a, down_b)}, shape, 2)
    assert [s.tolist() for s in a_shards] == [[[1, 2]], [[3, 4]]]
    assert all(torch.equal(s, down_b) for s in b)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("target", list(LORA_TARGETS))
def test_merge_per_shard_is_the_full_update_split_like_the_base(target, tp):
    """B_rank @ A_rank is exactly rank ``i``'s part of the full HF update split by the base
    weight's rule, so merging per shard merges the PEFT adapter."""
    shape = _shape()
    peft = _random_peft(target, shape, seed=1)
    deltas = tuple(b @ a for a, b in peft.values())
    rule = {"linear_qkv": FusedQKV("m", ("q", "k", "v")),
            "linear_fc1": FusedGateUp("m", ("gate", "up")),
            "linear_proj": TensorParallel("m", ("o",), dim=1),
            "linear_fc2": TensorParallel("m", ("down",), dim=1)}[target]
    want = rule.to_megatron(deltas, ShardContext(shape, tp, 0))
    for rank, (a, b) in enumerate(zip(*adapter_from_hf(target, peft, shape, tp))):
        torch.testing.assert_close(b @ a, want[rank], rtol=0, atol=1e-12, msg=f"rank {rank}")


def _fake_chunk(shape, tp):
    """What init_adapters walks: decoder.layers[*].{self_attention,mlp}.<target>.lora.{A,B},
    sized per TP rank as attach_lora sizes them."""
    sizes = {"linear_qkv": (64, 128 // tp), "linear_proj": (64 // tp, 64),
             "linear_fc1": (64, 192 // tp), "linear_fc2": (96 // tp, 64)}
    parents = PARENT
    layers = []
    for number in range(1, shape.num_layers + 1):
        layer = types.SimpleNamespace(layer_number=number, self_attention=types.SimpleNamespace(),
                                      mlp=types.SimpleNamespace())
        for t, (i, o) in sizes.items():
            lora = types.SimpleNamespace(A=torch.zeros(R, i), B=torch.zeros(o, R))
            setattr(getattr(layer, parents[t]), t, types.SimpleNamespace(lora=lora))
        layers.append(layer)
    return types.SimpleNamespace(decoder=types.SimpleNamespace(layers=layers))


def _init(monkeypatch, shape, tp, rank):
    from megatron.sft.lora.adapters import init_adapters

    monkeypatch.setattr(parallel_dims, "_DIMS", parallel_dims.ParallelDims(
        ParallelLayout(tp), world_size=tp, rank=rank, tp_rank=rank, pp_rank=0, dp_rank=0,
        dp_size=1))
    chunk = _fake_chunk(shape, tp)
    init_adapters([chunk], LoRASettings(R, 2.0 * R), seed=5, b_std=0.1)
    return chunk


@pytest.mark.parametrize("tp", [2, 4])
def test_split_equals_what_training_initialises_at_that_tp(monkeypatch, tp):
    """Adapters drawn at TP1, exported to PEFT form and split for TP ``tp`` are the ones
    training draws at that TP directly (its full-tensor-then-split init)."""
    shape = _shape()
    full = _init(monkeypatch, shape, 1, 0)
    ranks = [_init(monkeypatch, shape, tp, r) for r in range(tp)]
    for li, layer in enumerate(full.decoder.layers):
        for target in LORA_TARGETS:
            def lora(chunk):
                return getattr(getattr(chunk.decoder.layers[li], PARENT[target]),
                               target).lora
            assert lora(full).B.abs().sum() > 0
            peft = adapter_to_hf(target, [lora(full).A], [lora(full).B], shape)
            a_shards, b_shards = adapter_from_hf(target, peft, shape, tp)
            for r, chunk in enumerate(ranks):
                assert torch.equal(a_shards[r], lora(chunk).A), (li, target, r)
                assert torch.equal(b_shards[r], lora(chunk).B), (li, target, r)


def test_parts_with_different_lora_a_are_refused():
    shape = _shape()
    peft = _random_peft("linear_qkv", shape)
    k_a, k_b = peft["self_attn.k_proj"]
    peft["self_attn.k_proj"] = (k_a + 1, k_b)
    with pytest.raises(ValueError, match="lora_A of self_attn.k_proj differs.*one A"):
        adapter_from_hf("linear_qkv", peft, shape, 2)
    del peft["self_attn.k_proj"]
    with pytest.raises(ValueError, match="needs HF modules"):
        adapter_from_hf("linear_qkv", peft, shape, 2)
