"""The megatron-core router settings each MoE family's table computes reproduce that family's
transformers router: same experts chosen, same weights, on the same logits. Checked by running
both routers, not by reading their code; a flipped setting is shown to break it."""

import copy

import pytest
import torch

from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.bridge.architectures._moe import MoEConfigKeys
from megatron.sft.bridge.random_hf_model import _config_class
from sft_testing import ARCHITECTURES

#: the softmax top-k families (DeepSeek's routers: test_deepseek_routing.py)
MOE = [a for a in ARCHITECTURES if isinstance(get_architecture(a).moe, MoEConfigKeys)]
#: families that always renormalise (no ``norm_topk_prob``): Mixtral, GPT-OSS
ALWAYS = {a for a in MOE if isinstance(get_architecture(a).moe.renormalize, bool)}


def _router(block):
    return block.router if hasattr(block, "router") else block.gate  # GPT-OSS: mlp.router


def _hf_moe_block(arch, **overrides):
    import transformers

    spec = get_architecture(arch)
    cfg = _config_class(arch)(architectures=[arch],
                              **dict(copy.deepcopy(dict(spec.tiny_config)), **overrides))
    torch.manual_seed(0)
    model = getattr(transformers, arch)(cfg)
    shape = spec.shape(cfg.to_dict())
    block = model.model.layers[shape.moe.layers[0]].mlp
    with torch.no_grad():
        _router(block).weight.normal_(0, 1.0)
    return spec, cfg, block


def _megatron_routing(settings, logits):
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    t = settings.transformer
    return topk_routing_with_score_function(
        logits, t["moe_router_topk"], use_pre_softmax=t["moe_router_pre_softmax"],
        scaling_factor=t.get("moe_router_topk_scaling_factor"),
        score_function=t["moe_router_score_function"])


@pytest.mark.parametrize("arch, renormalize", [
    (a, r) for a in MOE for r in ((True,) if a in ALWAYS else (True, False))])
def test_routing_equals_transformers(arch, renormalize):
    overrides = {} if arch in ALWAYS else {"norm_topk_prob": renormalize}
    spec, cfg, block = _hf_moe_block(arch, **overrides)
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    logits, weights, chosen = _router(block)(x)  # transformers: [T, E], [T, k], [T, k]
    settings = spec.megatron_settings(cfg.to_dict())
    probs, routing_map = _megatron_routing(settings, logits.detach())
    hf_map = torch.zeros_like(routing_map).scatter(1, chosen, True)
    assert torch.equal(routing_map, hf_map)
    assert torch.allclose(probs.gather(1, chosen), weights.detach(), atol=1e-6, rtol=0)
    assert "moe_router_topk_scaling_factor" not in settings.transformer  # no family scales
    # The opposite setting gives different weights: the test can tell them apart.
    flipped = dict(settings.transformer,
                   moe_router_pre_softmax=not settings.transformer["moe_router_pre_softmax"])
    other, _ = _megatron_routing(type(settings)(flipped, settings.layer_spec), logits.detach())
    assert (other.gather(1, chosen) - weights.detach()).abs().max() > 1e-2
    if arch in ALWAYS:
        assert settings.transformer["moe_router_pre_softmax"] is False  # always renormalised
        return
    assert settings.transformer["moe_router_pre_softmax"] is (not renormalize)


def test_shared_expert_settings():
    """Qwen2-MoE adds ``sigmoid(x . g) * shared(x)`` with ``g`` its ``[1, hidden]``
    ``shared_expert_gate``; megatron-core's ``SharedExpertMLP`` with ``moe_shared_expert_gate``
    multiplies its output by ``sigmoid(linear(x, gate_weight))``. That they agree is shown by
    the logits parity test, which also shows the model without the gate does not."""
    spec, cfg, block = _hf_moe_block("Qwen2MoeForCausalLM")
    settings = spec.megatron_settings(cfg.to_dict()).transformer
    assert settings["moe_shared_expert_gate"] is True
    assert settings["moe_shared_expert_intermediate_size"] == cfg.shared_expert_intermediate_size
    assert tuple(block.shared_expert_gate.weight.shape) == (1, cfg.hidden_size)
    for arch in ("Qwen3MoeForCausalLM", "MixtralForCausalLM"):
        s = get_architecture(arch).megatron_settings(
            {"architectures": [arch], **get_architecture(arch).tiny_config}).transformer
        assert s["moe_shared_expert_intermediate_size"] is None
        assert s["moe_shared_expert_gate"] is False
