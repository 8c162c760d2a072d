"""Each architecture table covers exactly the tensors transformers creates for that model."""

import pytest

from sft_testing import ARCHITECTURES
from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.bridge.random_hf_model import TINY_CONFIGS
from megatron.sft.bridge.stage_mapping import required_hf_names


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("tied", [False, True])
def test_table_covers_transformers_state_dict(arch, tied):
    import transformers

    from megatron.sft.bridge.random_hf_model import _config_class

    cfg_kwargs = dict(TINY_CONFIGS[arch], tie_word_embeddings=tied)
    cfg = _config_class(arch)(architectures=[arch], **cfg_kwargs)
    model = getattr(transformers, arch)(cfg)
    hf_names = set(model.state_dict())
    if tied:
        hf_names.discard("lm_head.weight")  # saved files carry the shared tensor once
    spec = get_architecture(arch)
    assert set(required_hf_names(spec, spec.shape(cfg.to_dict()))) == hf_names
