"""The expert-bias flags become megatron-core's update rate (0 = frozen) for routers that have
a bias, and are refused, naming the flag, where they mean nothing; MLA models refuse the layer
modules and LoRA they cannot run with, before anything is built."""

import types

import pytest

from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.model.moe.settings import check_moe_run, moe_config_overrides


def _cfg(**kw):
    base = dict(moe_token_dispatcher_type=None, moe_aux_loss_coeff=None, moe_z_loss_coeff=None,
                moe_expert_capacity_factor=None, moe_router_bias_update_rate=None,
                moe_router_freeze_expert_bias=False, tensor_model_parallel_size=1,
                sequence_parallel=False, lora_rank=0, context_parallel_size=1,
                moe_router_freeze=False, moe_experts_freeze=False, expert_tensor_parallel_size=None)
    return types.SimpleNamespace(**{**base, **kw})


def _shape(arch):
    spec = get_architecture(arch)
    return spec.shape({"architectures": [arch], **dict(spec.tiny_config)})


def test_rate_and_freeze_reach_megatron_core_for_a_router_with_a_bias():
    v3 = _shape("DeepseekV3ForCausalLM")
    assert "moe_router_bias_update_rate" not in moe_config_overrides(_cfg(), v3)  # its 1e-3
    assert moe_config_overrides(_cfg(moe_router_bias_update_rate=0.01), v3)[
        "moe_router_bias_update_rate"] == 0.01
    assert moe_config_overrides(_cfg(moe_router_freeze_expert_bias=True), v3)[
        "moe_router_bias_update_rate"] == 0.0
    check_moe_run(_cfg(moe_router_freeze_expert_bias=True), v3)
    with pytest.raises(ValueError, match="give one"):
        check_moe_run(_cfg(moe_router_freeze_expert_bias=True,
                           moe_router_bias_update_rate=0.01), v3)
    with pytest.raises(ValueError, match="must be >= 0"):
        check_moe_run(_cfg(moe_router_bias_update_rate=-1.0), v3)


@pytest.mark.parametrize("arch, message", [("Qwen3MoeForCausalLM", "has no expert bias"),
                                           ("DeepseekV2ForCausalLM", "has no expert bias"),
                                           ("LlamaForCausalLM", "has no experts")])
def test_bias_flags_are_refused_where_there_is_no_bias(arch, message):
    with pytest.raises(ValueError, match=f"--moe-router-freeze-expert-bias: .*{message}"):
        check_moe_run(_cfg(moe_router_freeze_expert_bias=True), _shape(arch))


def test_mla_refuses_te_layers_and_lora():
    from megatron.sft.bridge.checkpoint_io import CheckpointError
    from megatron.sft.model.layer_impl import LayerImpl, LayerImplError
    from megatron.sft.training.lora_model import refuse_lora_on_mla

    with pytest.raises(LayerImplError, match="use --transformer-impl local"):
        LayerImpl("te", "sdpa").layer_spec(False, multi_latent_attention=True)
    spec = get_architecture("DeepseekV3ForCausalLM")
    meta = types.SimpleNamespace(architecture=spec.hf_architecture, hf_config={
        "architectures": [spec.hf_architecture], **dict(spec.tiny_config)})
    with pytest.raises(CheckpointError, match="LoRA on multi-latent attention"):
        refuse_lora_on_mla(meta)
