"""DeepSeek-V2/V3: the megatron-core router settings the tables compute choose the same experts
with the same weights as transformers' routers (run both on the same logits), MLA's softmax
scale equals transformers', and what megatron-core would compute differently is refused by name
before anything is read."""

import copy
import math

import pytest
import torch

from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.bridge.model_shape import UnsupportedModelError
from megatron.sft.bridge.random_hf_model import _config_class


def _hf_router(arch, **overrides):
    import transformers

    spec = get_architecture(arch)
    cfg = _config_class(arch)(architectures=[arch],
                              **dict(copy.deepcopy(dict(spec.tiny_config)), **overrides))
    torch.manual_seed(0)
    model = getattr(transformers, arch)(cfg)
    shape = spec.shape(cfg.to_dict())
    gate = model.model.layers[shape.moe.layers[0]].mlp.gate
    with torch.no_grad():
        gate.weight.normal_(0, 1.0)
        if hasattr(gate, "e_score_correction_bias"):  # large enough to change the choice
            gate.e_score_correction_bias.normal_(0, 0.3)
    return spec, cfg, gate


def _megatron_routing(t, logits, expert_bias=None):
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    return topk_routing_with_score_function(
        logits, t["moe_router_topk"], use_pre_softmax=t["moe_router_pre_softmax"],
        num_groups=t["moe_router_num_groups"], group_topk=t["moe_router_group_topk"],
        scaling_factor=t["moe_router_topk_scaling_factor"],
        score_function=t["moe_router_score_function"], expert_bias=expert_bias)


@pytest.mark.parametrize("arch, overrides", [
    ("DeepseekV3ForCausalLM", {}),                                       # 2 groups, top-1 group
    ("DeepseekV3ForCausalLM", {"n_group": 1, "topk_group": 1}),         # Moonlight, Kimi-K2
    ("DeepseekV2ForCausalLM", {}),                                       # V2-Lite: greedy
    ("DeepseekV2ForCausalLM", {"topk_method": "group_limited_greedy", "n_group": 4,
                               "topk_group": 2}),                        # V2: device-limited
])
def test_routing_equals_transformers(arch, overrides):
    spec, cfg, gate = _hf_router(arch, **overrides)
    x = torch.randn(256, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    logits, weights, chosen = gate(x)  # transformers: [T, E], [T, k], [T, k]
    t = spec.megatron_settings(cfg.to_dict()).transformer
    bias = getattr(gate, "e_score_correction_bias", None)
    assert t["moe_router_enable_expert_bias"] is (bias is not None)
    probs, routing_map = _megatron_routing(t, logits.detach(), bias)
    hf_map = torch.zeros_like(routing_map).scatter(1, chosen, True)
    assert torch.equal(routing_map, hf_map)
    assert torch.allclose(probs.gather(1, chosen), weights.detach(), atol=1e-6, rtol=0)
    assert t["moe_router_topk_scaling_factor"] == cfg.routed_scaling_factor
    # Each setting matters on these logits: the check can tell a dropped one apart.
    if bias is not None:
        _, no_bias = _megatron_routing(t, logits.detach(), None)
        assert not torch.equal(no_bias, hf_map)
    # (V2's group_limited_greedy is accepted only with top-k = topk_group, where scoring a
    # group by its best expert never binds; V3's two-best scoring does.)
    if t["moe_router_num_groups"] and t["moe_router_score_function"] == "sigmoid":
        _, ungrouped = _megatron_routing(dict(t, moe_router_num_groups=None,
                                              moe_router_group_topk=None), logits.detach(), bias)
        assert not torch.equal(ungrouped, hf_map)
    unscaled, _ = _megatron_routing(dict(t, moe_router_topk_scaling_factor=None),
                                    logits.detach(), bias)
    assert (unscaled.gather(1, chosen) - weights.detach()).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"])
def test_mla_softmax_scale_and_shape_equal_transformers(arch):
    """megatron-core's ``mscale^2 / sqrt(q_head_dim)`` from the settings = transformers'
    ``DeepseekV*Attention.scaling`` (YaRN's ``mscale_all_dim`` in the V3 tiny config)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import \
        _yarn_get_mscale
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    spec = get_architecture(arch)
    cfg = _config_class(arch)(architectures=[arch], **copy.deepcopy(dict(spec.tiny_config)))
    attention = {"DeepseekV3ForCausalLM": DeepseekV3Attention,
                 "DeepseekV2ForCausalLM": DeepseekV2Attention}[arch]
    hf_scale = attention(cfg, 0).scaling
    t = spec.megatron_settings(cfg.to_dict()).transformer
    mscale = _yarn_get_mscale(t["rotary_scaling_factor"], t["mscale_all_dim"])
    ours = mscale * mscale / math.sqrt(t["qk_head_dim"] + t["qk_pos_emb_head_dim"])
    assert ours == pytest.approx(hf_scale, rel=1e-12)
    if arch == "DeepseekV3ForCausalLM":
        assert ours != pytest.approx(1 / math.sqrt(t["qk_head_dim"] + t["qk_pos_emb_head_dim"]))
    shape = spec.shape(cfg.to_dict())
    assert shape.flag("q_lora") is (cfg.q_lora_rank is not None)
    assert shape.dim("q_heads") == cfg.num_attention_heads * (cfg.qk_nope_head_dim
                                                              + cfg.qk_rope_head_dim)


@pytest.mark.parametrize("arch, overrides, message", [
    ("DeepseekV3ForCausalLM", {"norm_topk_prob": False}, "always renormalises"),
    ("DeepseekV3ForCausalLM", {"num_experts_per_tok": 3}, "scores a group by its two best"),
    ("DeepseekV3ForCausalLM", {"rope_interleave": False}, "rope_interleave=false"),
    ("DeepseekV3ForCausalLM", {"attention_bias": True}, "attention_bias=true"),
    ("DeepseekV3ForCausalLM", {"moe_layer_freq": 2}, "moe_layer_freq=2"),
    ("DeepseekV2ForCausalLM", {"topk_method": "group_limited_greedy", "n_group": 4,
                               "topk_group": 1}, "scores a group by its best expert"),
])
def test_what_megatron_core_computes_differently_is_refused(arch, overrides, message):
    spec = get_architecture(arch)
    with pytest.raises(UnsupportedModelError, match=message):
        spec.shape({"architectures": [arch], **dict(spec.tiny_config), **overrides})


def test_deepseek_v32_is_refused_by_name():
    from megatron.sft.bridge.architectures import architecture_of

    with pytest.raises(UnsupportedModelError, match="DeepSeek-V3.2's sparse attention"):
        architecture_of({"architectures": ["DeepseekV32ForCausalLM"]})
