"""Sharding arithmetic against megatron-core's own layer-offset function; config parsing."""

import pytest
import torch

from megatron.sft.bridge.architectures import get_architecture, supported_architectures
from megatron.sft.runtime.layout import LayoutError, ParallelLayout, rank_dir_name, virtual_stages
from megatron.sft.bridge.model_shape import UnsupportedModelError


def _shape(layers=8, heads=4, groups=2, ffn=64):
    return get_architecture("LlamaForCausalLM").shape(dict(
        architectures=["LlamaForCausalLM"], num_hidden_layers=layers, hidden_size=32,
        intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=groups,
        vocab_size=100))


@pytest.mark.parametrize("pp, vpp", [(1, None), (2, None), (4, None), (2, 2), (2, 4), (4, 2)])
def test_chunk_layers_match_megatron_core(pp, vpp):
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    shape = _shape(layers=16)
    layout = ParallelLayout(1, pp, vpp)
    cfg = TransformerConfig(num_layers=16, hidden_size=32, num_attention_heads=4,
                            pipeline_model_parallel_size=pp,
                            virtual_pipeline_model_parallel_size=vpp,
                            pipeline_dtype=torch.float32)
    seen = []
    for rank in range(pp):
        for chunk in range(layout.chunks):
            layers = layout.chunk_layers(shape, rank, chunk)
            offset = get_transformer_layer_offset(cfg, vp_stage=chunk if vpp else None,
                                                  pp_rank=rank)
            assert layers.start == offset
            seen.extend(layers)
    assert sorted(seen) == list(range(16))


def test_documented_vpp_example():
    layout = ParallelLayout(1, 2, 2)
    shape = _shape(layers=8)
    assert [list(layout.chunk_layers(shape, r, c)) for r in (0, 1) for c in (0, 1)] == \
        [[0, 1], [4, 5], [2, 3], [6, 7]]


def test_layout_errors_suggest_valid_sizes():
    with pytest.raises(LayoutError, match=r"Valid TP sizes: \[1, 2, 4\]; valid PP"):
        ParallelLayout(3, 1).validate(_shape())
    with pytest.raises(LayoutError, match="virtual pipeline stages need PP >= 2"):
        ParallelLayout(1, 1, 2).validate(_shape())


def test_rank_dir_names():
    assert rank_dir_name(0, 0, 1) == "mp_rank_00"
    assert rank_dir_name(1, 2, 4) == "mp_rank_01_002"


def test_rope_spellings_agree():
    arch = get_architecture("LlamaForCausalLM")
    base = dict(architectures=["LlamaForCausalLM"], num_hidden_layers=2, hidden_size=32,
                intermediate_size=64, num_attention_heads=4, vocab_size=100)
    hub = arch.shape(dict(base, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    v5 = arch.shape(dict(base, rope_parameters={
        "rope_type": "llama3", "factor": 32.0, "rope_theta": 500000.0}))
    assert hub.rope == v5.rope and hub.rope.llama3_factor == 32.0 and hub.rope.theta == 500000.0
    with pytest.raises(UnsupportedModelError, match="high_freq_factor=2.0 is not supported"):
        arch.shape(dict(base, rope_scaling={"rope_type": "llama3", "factor": 8,
                                            "high_freq_factor": 2.0}))
    with pytest.raises(UnsupportedModelError, match="rope_type 'dynamic' is not supported"):
        arch.shape(dict(base, rope_scaling={"rope_type": "dynamic", "factor": 4}))
    with pytest.raises(UnsupportedModelError, match="'yarn' without "
                                                    "original_max_position_embeddings"):
        arch.shape(dict(base, rope_scaling={"rope_type": "yarn", "factor": 4}))
    yarn = arch.shape(dict(base, rope_scaling={"rope_type": "yarn", "factor": 4,
                                               "original_max_position_embeddings": 64}))
    assert dict(yarn.rope.yarn) == {"factor": 4, "original_max_position_embeddings": 64}
    with pytest.raises(UnsupportedModelError, match="hidden_act 'gelu'"):
        arch.shape(dict(base, hidden_act="gelu"))


def test_architecture_flags():
    assert supported_architectures() == ["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM",
                                         "GptOssForCausalLM", "LlamaForCausalLM",
                                         "MistralForCausalLM",
                                         "MixtralForCausalLM", "Qwen2ForCausalLM",
                                         "Qwen2MoeForCausalLM", "Qwen3ForCausalLM",
                                         "Qwen3MoeForCausalLM"]
    cfg = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
               vocab_size=10)
    assert get_architecture("Qwen2ForCausalLM").shape(cfg).qkv_bias
    assert not get_architecture("Qwen3ForCausalLM").shape(cfg).qkv_bias
    assert get_architecture("Qwen3ForCausalLM").shape(cfg).qk_layernorm
    assert get_architecture("LlamaForCausalLM").shape(dict(cfg, attention_bias=True)).qkv_bias
    assert get_architecture("MistralForCausalLM").shape(
        dict(cfg, head_dim=16)).head_dim == 16


def test_virtual_stages_from_layers_per_stage():
    assert virtual_stages(8, 2, None) is None
    assert virtual_stages(8, 2, 2) == 2 and virtual_stages(24, 4, 1) == 6
    assert virtual_stages(8, 2, 4) is None
    with pytest.raises(LayoutError, match="3 layers per virtual pipeline stage x PP 2 does not divide"):
        virtual_stages(8, 2, 3)


def test_tp_may_exceed_kv_heads_when_it_is_a_multiple():
    ParallelLayout(2, 1).validate(_shape(heads=4, groups=1))   # megatron-core replicates KV
    ParallelLayout(4, 1).validate(_shape(heads=4, groups=2))
    with pytest.raises(LayoutError, match="TP=2 and num_key_value_heads=3: one must divide"):
        ParallelLayout(2, 1).validate(_shape(heads=6, groups=3, ffn=66))
