"""LoRA's HF module names come from each architecture's weight rules, and they are the modules
transformers builds: every adapted name is a Linear of the tiny HF model, and the four targets
cover every Linear of a decoder layer exactly once (on a Mixture-of-Experts layer the MLP
targets are the shared expert's; routers and the shared expert's one-output gate are not
adapted, and routed experts are not Linear modules in transformers 5)."""

import copy

import pytest
import torch

from sft_testing import ARCHITECTURES
from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.bridge.random_hf_model import _config_class
from megatron.sft.lora.settings import LORA_TARGETS
from megatron.sft.lora.split import hf_target_modules, layer_target_names, target_names


def _hf_model(arch):
    import transformers

    spec = get_architecture(arch)
    cfg = _config_class(arch)(architectures=[arch], **copy.deepcopy(dict(spec.tiny_config)))
    return getattr(transformers, arch)(cfg), spec


#: multi-latent attention has no q/k/v linears: LoRA refuses those models (lora_model)
LORA_ARCHITECTURES = [a for a in ARCHITECTURES if get_architecture(a).mla is None]


@pytest.mark.parametrize("arch", LORA_ARCHITECTURES)
def test_derived_names_are_the_linears_transformers_builds(arch):
    model, spec = _hf_model(arch)
    shape = spec.shape(model.config.to_dict())
    modules = dict(model.named_modules())
    layers = model.config.num_hidden_layers
    covered = []
    for target in LORA_TARGETS:
        found = False
        for layer in range(layers):
            names = layer_target_names(spec, shape, layer, target)
            if names is None:  # a MoE layer's MLP without a shared expert
                continue
            found = True
            for module in names.modules:
                full = names.layer_prefix.format(i=layer) + module
                assert isinstance(modules.get(full), torch.nn.Linear), (arch, target, full)
                covered.append(full)
        if not found:  # GPT-OSS: every layer's MLP is routed experts only
            continue
        # PEFT's key for the adapter is the module path under base_model.model.
        names = target_names(spec, target)
        assert names.peft_name(0, names.modules[0], "A") == \
            f"base_model.model.{names.layer_prefix.format(i=0)}{names.modules[0]}.lora_A.weight"
    linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)
               and n.startswith("model.layers.") and not n.endswith("shared_expert_gate")]
    assert sorted(covered) == sorted(linears), "each decoder Linear is adapted exactly once"
    assert set(hf_target_modules(spec, tuple(LORA_TARGETS), shape)) == \
        {n.rsplit(".", 1)[-1] for n in linears}


def test_an_architecture_without_the_rule_is_a_table_error():
    import dataclasses

    spec = get_architecture("LlamaForCausalLM")
    broken = dataclasses.replace(spec, rules=tuple(r for r in spec.rules
                                                  if "linear_fc2" not in r.megatron))
    with pytest.raises(ValueError, match="has 0 rules for decoder.layers.{i}.mlp.linear_fc2"):
        target_names(broken, "linear_fc2")
