"""The architecture seam for Mixture-of-Experts families, on a toy MoE table (not registered):
``{e}`` rules expanded per expert-parallel rank with local Megatron / global HF indices,
per-layer conditions (``moe_layer`` / ``dense_layer``), settings computed from the HF config,
and FLOPs that count only active parameters."""

import dataclasses

import pytest
import torch

from megatron.sft.bridge.architectures import ArchitectureSpec, MegatronSettings
from megatron.sft.bridge.architectures.llama import DENSE_DECODER_RULES
from megatron.sft.bridge.model_shape import MoEShape
from megatron.sft.bridge.rules import Replicated, ShardContext, TensorParallel, gate_up
from megatron.sft.bridge.stage_mapping import build_stage, expected_hf_shapes, name_pairs, \
    stage_to_hf
from megatron.sft.runtime.layout import ParallelLayout
from megatron.sft.training.metrics import training_flops_per_token

_L, _H = "decoder.layers.{i}.mlp.", "model.layers.{i}.mlp."
_DENSE_MLP = ("linear_fc1.weight", "linear_fc2.weight")


def _rules():
    dense = tuple(dataclasses.replace(r, when="dense_layer")
                  if r.megatron.endswith(_DENSE_MLP) else r for r in DENSE_DECODER_RULES)
    experts = (
        Replicated(_L + "router.weight", (_H + "gate.weight",), (("experts", "hidden"),),
                   when="moe_layer"),
        gate_up(_L + "experts.local_experts.{e}.linear_fc1.weight",
                gate=_H + "experts.{e}.gate_proj.weight", up=_H + "experts.{e}.up_proj.weight",
                when="moe_layer", ffn="expert_ffn"),
        TensorParallel(_L + "experts.local_experts.{e}.linear_fc2.weight",
                       (_H + "experts.{e}.down_proj.weight",), (("hidden", "expert_ffn"),),
                       dim=1, when="moe_layer"),
    )
    return dense + experts


def _moe(cfg):
    return MoEShape(num_experts=cfg["num_experts"], top_k=cfg["num_experts_per_tok"],
                    ffn_hidden_size=cfg["moe_intermediate_size"],
                    layers=tuple(i for i in range(cfg["num_hidden_layers"]) if i % 2 == 0))


TOY = ArchitectureSpec(
    hf_architecture="ToyMoeForCausalLM", hf_config_class="-", rules=_rules(), tiny_config={},
    moe=_moe,
    configure=lambda cfg, shape: MegatronSettings(
        {"num_moe_experts": shape.moe.num_experts, "moe_router_topk": shape.moe.top_k},
        {"num_experts": shape.moe.num_experts}),
    transformer_overrides={"moe_router_pre_softmax": True})
CONFIG = dict(architectures=["ToyMoeForCausalLM"], num_hidden_layers=4, hidden_size=8,
              intermediate_size=12, moe_intermediate_size=6, num_experts=4,
              num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=1,
              vocab_size=20, tie_word_embeddings=False)


def test_experts_expand_with_local_megatron_and_global_hf_indices():
    shape = TOY.shape(CONFIG)
    # PP2 x EP2: pipeline rank 1 holds layers 2 (MoE) and 3 (dense); EP rank 1 experts 2, 3.
    pairs = dict(name_pairs(TOY, shape, ParallelLayout(1, 2, ep=2), pp_rank=1, chunk=0,
                            ep_rank=1))
    assert pairs["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"] == (
        "model.layers.2.mlp.experts.2.gate_proj.weight",
        "model.layers.2.mlp.experts.2.up_proj.weight")
    assert pairs["decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight"] == (
        "model.layers.2.mlp.experts.3.down_proj.weight",)
    assert pairs["decoder.layers.0.mlp.router.weight"] == ("model.layers.2.mlp.gate.weight",)
    assert pairs["decoder.layers.1.mlp.linear_fc1.weight"] == (
        "model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight")
    # a dense layer has no experts, a MoE layer no dense MLP
    assert not any(m.startswith("decoder.layers.1.mlp.experts") for m in pairs)
    assert "decoder.layers.0.mlp.linear_fc1.weight" not in pairs
    assert sum("local_experts" in m for m in pairs) == 2 * 2  # 2 experts x fc1, fc2


def test_every_expert_of_every_moe_layer_is_named_once_with_its_shape():
    shape = TOY.shape(CONFIG)
    expected = expected_hf_shapes(TOY, shape)
    experts = sorted(n for n in expected if ".experts." in n)
    assert experts == sorted(f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"
                             for i in (0, 2) for e in range(4) for p in ("gate", "up", "down"))
    assert expected["model.layers.0.mlp.experts.3.down_proj.weight"] == (8, 6)
    assert expected["model.layers.2.mlp.gate.weight"] == (4, 8)
    assert "model.layers.1.mlp.gate_proj.weight" in expected
    assert "model.layers.0.mlp.gate_proj.weight" not in expected
    # What every EP rank holds, together, is each expert exactly once.
    held = [hf for ep in range(2) for pp in range(2)
            for m, hfs in name_pairs(TOY, shape, ParallelLayout(1, 2, ep=2), pp, 0, ep)
            if "local_experts" in m for hf in hfs]
    assert sorted(held) == experts


def test_expert_tensors_round_trip_through_the_shared_rule_code():
    shape = TOY.shape(CONFIG)
    layout = ParallelLayout(2, 1)
    gen = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=gen) for n, s in expected_hf_shapes(TOY, shape).items()}
    ctx = ShardContext(shape, 2, padded_vocab_size=32)
    ranks = build_stage(hf.__getitem__, TOY, shape, layout, 0, ctx)
    fc1 = ranks[1]["model"]["decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight"]
    gate, up = hf["model.layers.2.mlp.experts.3.gate_proj.weight"], \
        hf["model.layers.2.mlp.experts.3.up_proj.weight"]
    assert torch.equal(fc1, torch.cat([gate[3:], up[3:]]))  # [gate_shard; up_shard] of rank 1
    back = dict(stage_to_hf(ranks, TOY, shape, layout, 0, ctx))
    assert sorted(back) == sorted(hf) and all(torch.equal(back[n], hf[n]) for n in hf)


def test_settings_are_computed_from_the_config():
    settings = TOY.megatron_settings(CONFIG)
    assert settings.transformer == {"moe_router_pre_softmax": True, "num_moe_experts": 4,
                                    "moe_router_topk": 2}
    assert settings.layer_spec == {"num_experts": 4}
    with pytest.raises(ValueError, match="when='moe_layer' needs a per-layer rule"):
        TOY.shape(CONFIG).flag("moe_layer")


def test_flops_count_active_parameters():
    """By hand, per token, forward multiply-adds: attention projections 8*(8+2*4) + 8*8 = 192
    per layer; MoE layers (0, 2): top-2 experts 2*3*8*6 = 288 + router 8*4 = 32; dense layers
    (1, 3): 3*8*12 = 288; LM head 20*8 = 160. Causal attention over one 10-token document is
    2 * layers * q * l FLOPs per token; training is 3x forward."""
    shape = TOY.shape(CONFIG)
    matmuls = 4 * 192 + 2 * (288 + 32) + 2 * 288 + 160
    attention = 2 * 4 * 8 * 10  # 2 * layers * q * l  (per token, l = 10)
    assert training_flops_per_token(shape, 10) == 3 * (2 * matmuls + attention)
    dense = dataclasses.replace(shape, moe=None)  # the same model without experts
    assert training_flops_per_token(dense, 10) == 3 * (2 * (4 * 192 + 4 * 288 + 160) + attention)
