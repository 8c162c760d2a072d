"""Each architecture table covers exactly the tensors transformers saves for that model, and a
MoE family's fused expert form covers exactly the tensors transformers holds in memory."""

import copy

import pytest

from megatron.sft.bridge.fused_export import fused_export

from sft_testing import ARCHITECTURES
from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.bridge.stage_mapping import required_hf_names


def _model(arch, tied):
    import transformers

    from megatron.sft.bridge.random_hf_model import _config_class

    spec = get_architecture(arch)
    cfg_kwargs = dict(copy.deepcopy(dict(spec.tiny_config)), tie_word_embeddings=tied)
    cfg = _config_class(arch)(architectures=[arch], **cfg_kwargs)
    return spec, cfg, getattr(transformers, arch)(cfg)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("tied", [False, True])
def test_table_covers_transformers_checkpoint(arch, tied, tmp_path):
    from safetensors import safe_open

    spec, cfg, model = _model(arch, tied)
    if spec.moe is None:
        saved = set(model.state_dict())  # dense models save what they hold
    else:  # transformers 5 converts the fused experts back to one tensor per expert on save
        model.save_pretrained(tmp_path)
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            saved = set(f.keys())
    if tied:
        saved.discard("lm_head.weight")  # saved files carry the shared tensor once
    names = set(required_hf_names(spec, spec.shape(cfg.to_dict())))
    fused = fused_export(spec, spec.shape(cfg.to_dict()))
    if fused is not None:  # GPT-OSS: transformers saves (and export writes) the fused form
        names = {fused.part_of.get(n, (n,))[0] for n in names}
    assert names == saved


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if get_architecture(a).moe])
def test_fused_expert_form_is_what_transformers_holds_in_memory(arch):
    """The names conversion accepts in the fused form: the table's names with each fused
    tensor's parts replaced by it, and the declared renames applied."""
    spec, cfg, model = _model(arch, False)
    shape = spec.shape(cfg.to_dict())
    names = set(required_hf_names(spec, shape))
    layout = spec.fused_experts
    for layer in shape.moe.layers:
        for f in layout.tensors:
            parts = {p.format(i=layer, e=e) for p in f.parts for e in range(shape.moe.num_experts)}
            assert parts <= names
            names = (names - parts) | {f.fused.format(i=layer)}
        for fused_name, per_expert in layout.renames:
            names = (names - {per_expert.format(i=layer)}) | {fused_name.format(i=layer)}
    assert names == set(model.state_dict())
