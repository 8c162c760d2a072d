"""Each architecture table covers exactly the tensors transformers creates for that model."""

import copy

import pytest

from sft_testing import ARCHITECTURES
from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.bridge.stage_mapping import required_hf_names


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("tied", [False, True])
def test_table_covers_transformers_state_dict(arch, tied):
    import transformers

    from megatron.sft.bridge.random_hf_model import _config_class

    spec = get_architecture(arch)
    cfg_kwargs = dict(copy.deepcopy(dict(spec.tiny_config)), tie_word_embeddings=tied)
    cfg = _config_class(arch)(architectures=[arch], **cfg_kwargs)
    model = getattr(transformers, arch)(cfg)
    hf_names = set(model.state_dict())
    if tied:
        hf_names.discard("lm_head.weight")  # saved files carry the shared tensor once
    assert set(required_hf_names(spec, spec.shape(cfg.to_dict()))) == hf_names
