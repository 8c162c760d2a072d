"""The architecture registry is complete and consistent: every module in the architectures
package registers exactly one spec, and every spec's declared names exist in transformers and
megatron-core. These are the checks that replace a hand-maintained list."""

import copy
import dataclasses
import importlib

import pytest

from megatron.sft.bridge.architectures import (
    ArchitectureSpec,
    architecture_modules,
    defining_modules,
    get_architecture,
    registered_specs,
    supported_architectures,
)
from megatron.sft.bridge.architectures.base import register
from megatron.sft.bridge.rules import FusedGateUp, FusedQKV, gate_up, qkv
from sft_testing import ARCHITECTURES


def test_every_architecture_module_registers_exactly_one_spec():
    modules = architecture_modules()
    owners = defining_modules()
    assert sorted(owners.values()) == sorted(modules), (
        "each module in megatron/sft/bridge/architectures/ (except base and _helpers) must call "
        f"register(ArchitectureSpec(...)) once; modules: {modules}, registered by: {owners}")
    for module in modules:
        specs = [v for v in vars(importlib.import_module(module)).values()
                 if isinstance(v, ArchitectureSpec)]
        assert len(specs) == 1 and registered_specs()[specs[0].hf_architecture] is specs[0], \
            f"{module} defines {len(specs)} specs; define and register exactly one"


def test_tests_iterate_the_registry():
    assert ARCHITECTURES == supported_architectures() == sorted(registered_specs())
    assert all(get_architecture(n).hf_architecture == n for n in ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_config_builds_the_declared_transformers_classes(arch):
    import transformers

    spec = get_architecture(arch)
    config_cls = getattr(transformers, spec.hf_config_class, None)
    assert config_cls is not None, f"transformers has no {spec.hf_config_class}"
    assert hasattr(transformers, spec.hf_architecture), f"transformers has no {arch}"
    assert spec.tiny_config, f"{arch} declares no tiny_config"
    cfg = config_cls(architectures=[arch], **copy.deepcopy(dict(spec.tiny_config)))
    for key, value in spec.tiny_config.items():
        if key not in ("rope_scaling", "rope_theta"):  # transformers 5 moves these
            assert getattr(cfg, key) == value, f"{spec.hf_config_class} ignored {key}={value}"
    spec.shape(cfg.to_dict())  # the bridge accepts what transformers writes


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_megatron_settings_name_transformer_config_fields_and_spec_parameters(arch):
    import inspect

    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    spec = get_architecture(arch)
    settings = spec.megatron_settings({"architectures": [arch], **spec.tiny_config})
    # model.config builds megatron-core's MLA config class for multi-latent attention
    config_class = MLATransformerConfig if settings.transformer.get("multi_latent_attention") \
        else TransformerConfig
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = set(settings.transformer) - fields
    assert not unknown, f"{arch}: {sorted(unknown)} are not TransformerConfig fields"
    for builder in (specs.get_gpt_layer_local_spec,
                    specs.get_gpt_layer_with_transformer_engine_spec):
        unknown = set(settings.layer_spec) - set(inspect.signature(builder).parameters)
        assert not unknown, f"{arch}: {sorted(unknown)} are not {builder.__name__} parameters"


def test_a_second_module_cannot_register_the_same_name():
    spec = get_architecture("LlamaForCausalLM")
    with pytest.raises(ValueError, match="registered by both megatron.sft.bridge.architectures.llama"):
        register(dataclasses.replace(spec))
    assert get_architecture("LlamaForCausalLM") is spec


def test_named_fused_rules_are_the_positional_ones():
    assert qkv("a.weight", q="q", k="k", v="v") == FusedQKV(
        "a.weight", ("q", "k", "v"), (("q", "hidden"), ("kv", "hidden"), ("kv", "hidden")))
    assert qkv("a.bias", q="q", k="k", v="v", when="qkv_bias") == FusedQKV(
        "a.bias", ("q", "k", "v"), (("q",), ("kv",), ("kv",)), when="qkv_bias")
    assert gate_up("b.weight", gate="g", up="u") == FusedGateUp(
        "b.weight", ("g", "u"), (("ffn", "hidden"), ("ffn", "hidden")))
    with pytest.raises(ValueError, match="neither a .weight nor a .bias"):
        qkv("a.scale", q="q", k="k", v="v")
