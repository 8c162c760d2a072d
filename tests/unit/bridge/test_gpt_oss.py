"""GPT-OSS pieces against transformers' own code: the clamped SwiGLU (alpha, limit, +1) as
megatron-core's settings compute it, the interleaved gate/up layout, YaRN's frequencies and
attention factor, the per-layer windows; and the refusals."""

from types import SimpleNamespace

import pytest
import torch

from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.bridge.architectures.gpt_oss import deinterleave, interleave
from megatron.sft.bridge.model_shape import UnsupportedModelError
from megatron.sft.runtime.layout import LayoutError, ParallelLayout

ARCH = "GptOssForCausalLM"


def _hf_config(**overrides):
    from transformers import GptOssConfig

    return GptOssConfig(architectures=[ARCH], **{**get_architecture(ARCH).tiny_config, **overrides})


def test_clamped_swiglu_is_transformers_gate():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from megatron.sft.model.moe.grouped_mm import _glu

    cfg = _hf_config()
    experts = GptOssExperts(cfg)
    spec = get_architecture(ARCH)
    settings = spec.megatron_settings(cfg.to_dict()).transformer
    mcore = SimpleNamespace(gated_linear_unit=True, **{k: settings[k] for k in (
        "activation_func", "glu_linear_offset", "activation_func_clamp_value")})
    # values well past the limit (7) on both sides, interleaved as transformers holds them
    gate_up = torch.randn(64, 2 * cfg.intermediate_size, dtype=torch.float64) * 6
    theirs = experts._apply_gate(gate_up)
    gate, up = deinterleave(gate_up.T.contiguous().T)  # columns -> [F, tokens] rows
    ours = _glu(mcore, torch.cat([gate.T, up.T], -1))  # megatron-core's [gate | up] halves
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert (gate_up.abs() > 7).float().mean() > 0.1  # the clamp was exercised
    # and the numbers it stands for: limit 7, offset 1, alpha 1.702
    assert (settings["activation_func_clamp_value"], settings["glu_linear_offset"]) == (7.0, 1.0)


def test_interleaved_layout_round_trips_and_splits_gate_from_up():
    w = torch.arange(3 * 8).view(3, 8)  # [hidden 3, 2F 8]: columns g0 u0 g1 u1 ...
    gate, up = deinterleave(w)
    assert gate.tolist() == [[0, 8, 16], [2, 10, 18], [4, 12, 20], [6, 14, 22]]
    assert up[0].tolist() == [1, 9, 17]
    assert torch.equal(interleave(gate, up), w)
    b = torch.arange(8)
    assert torch.equal(interleave(*deinterleave(b)), b)


def test_yarn_frequencies_and_factor_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron.sft.bridge.architectures import shape_of
    from megatron.sft.model.yarn import YarnConfig, yarn_inv_freq

    for truncate in (False, True):
        params = dict(get_architecture(ARCH).tiny_config["rope_parameters"], truncate=truncate)
        cfg = _hf_config(rope_parameters=params)
        theirs, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
        _, shape = shape_of(cfg.to_dict())
        yarn = YarnConfig(**dict(shape.rope.yarn))
        assert yarn.truncate is truncate
        torch.testing.assert_close(yarn_inv_freq(yarn, shape.rope.theta, shape.head_dim),
                                   theirs.float(), rtol=1e-6, atol=0)
        assert abs(yarn.scores_factor() - factor) < 1e-12


def test_layer_types_become_per_layer_windows():
    from megatron.sft.bridge.architectures import shape_of
    from megatron.sft.model.attention.core import layer_window
    from megatron.sft.model.config import _per_layer_attention

    _, shape = shape_of(_hf_config().to_dict())
    assert shape.sliding_window is None and shape.window_layers == (True, False, True, False)
    cfg = SimpleNamespace(**_per_layer_attention(shape))
    assert [layer_window(cfg, n) for n in (1, 2, 3, 4)] == [8, None, 8, None]


def test_unsupported_settings_are_refused():
    spec = get_architecture(ARCH)
    with pytest.raises(UnsupportedModelError, match="swiglu_alpha=1.5"):
        spec.megatron_settings(_hf_config(swiglu_alpha=1.5).to_dict())
    from megatron.sft.model.builder import check_expert_bias_layout

    shape = spec.shape(_hf_config().to_dict())
    with pytest.raises(LayoutError, match="experts with biases run at expert tensor parallel "
                                          "size 1 only.*--expert-tensor-parallel-size 1"):
        check_expert_bias_layout(shape, ParallelLayout(2, 1, ep=2))
    check_expert_bias_layout(shape, ParallelLayout(2, 1, ep=2, etp=1))  # whole experts at TP2
    with pytest.raises(LayoutError, match="sequential cannot train experts with biases"):
        check_expert_bias_layout(shape, ParallelLayout(), "sequential")
    check_expert_bias_layout(shape, ParallelLayout(1, 2, ep=2), "sequential")
    check_expert_bias_layout(shape, ParallelLayout(), "grouped_mm")
