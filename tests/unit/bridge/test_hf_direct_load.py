"""``--load HF_DIR`` without a converted checkpoint: every rank's tensors read from the HF
safetensors (only its shard's bytes, ``bridge/rank_shard.py``) equal the converter's rank files
bit for bit, for every registered architecture at TP2 x PP2, PP2 x VPP2 and, for MoE, TP2 x EP2
(fused experts too); plus HF-directory detection and the fingerprint."""

import json

import pytest
import torch

from megatron.sft.bridge.architectures import shape_of
from megatron.sft.bridge.checkpoint_io import iteration_dir, load_rank_state, read_metadata
from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.bridge.hf_source import (
    check_same_source,
    describe_load_problem,
    hf_checkpoint_metadata,
    hf_fingerprint,
    is_hf_model_dir,
)
from megatron.sft.bridge.random_hf_model import make_random_hf_model
from megatron.sft.bridge.rank_shard import _runs, rank_state
from megatron.sft.bridge.rules import ShardContext
from megatron.sft.bridge.stage_mapping import build_stage
from megatron.sft.runtime.layout import LayoutError, ParallelLayout
from sft_testing import ARCHITECTURES

MOE = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM",
       "DeepseekV3ForCausalLM")
#: fused experts (DeepSeek's fused form goes through the same ExpertLayoutSource: its round
#: trip is tests/integration/moe/test_moe_conversion.py)
FUSED = MOE[:3]
LAYOUTS = [ParallelLayout(2, 2), ParallelLayout(1, 2, 2), ParallelLayout(2, 1, ep=2)]


def _layouts(arch, shape):
    for layout in LAYOUTS:
        if layout.ep > 1 and arch not in MOE:
            continue
        try:
            layout.validate(shape)
        except (LayoutError, ValueError):
            continue
        yield layout


def _check_equal_to_converter(hf, tmp_path, params_dtype=None, on_disk=False):
    """Each rank's tensors vs the converter's: its ``build_stage`` (what it writes) in memory,
    or with ``on_disk`` its rank files and metadata."""
    config = json.loads((hf / "config.json").read_text())
    spec, shape = shape_of(config)
    checked = 0
    for n, layout in enumerate(_layouts(config["architectures"][0], shape)):
        meta, source = hf_checkpoint_metadata(hf, layout, params_dtype=params_dtype,
                                              log=lambda m: None)
        ctx = ShardContext(shape, layout.tp, meta.padded_vocab_size)
        dtype = getattr(torch, meta.params_dtype)
        if on_disk:
            out = tmp_path / f"conv{n}"
            convert_hf_to_megatron(hf, out, ConvertOptions(layout=layout, progress=False,
                                                           params_dtype=params_dtype))
            it = iteration_dir(out)
            converted = read_metadata(it)
            for field in ("architecture", "hf_config", "layout", "padded_vocab_size",
                          "params_dtype", "make_vocab_size_divisible_by"):
                assert getattr(meta, field) == getattr(converted, field), field

        def cast(t):
            return t.to(dtype) if t.is_floating_point() else t

        for pp in range(layout.pp):
            for ep in range(layout.ep):
                stage = (None if on_disk else
                         build_stage(lambda h: cast(source.read(h)), spec, shape, layout, pp,
                                     ctx, ep_rank=ep))
                for tp in range(layout.tp):
                    want = (load_rank_state(it, layout, tp, pp, ep, mmap=False) if on_disk
                            else stage[tp])
                    got = rank_state(source, spec, shape, layout, ctx, tp, pp, ep, dtype)
                    for key, tensors in got.items():
                        assert sorted(tensors) == sorted(want[key]), (layout, key)
                        for name, t in tensors.items():
                            w = want[key][name]
                            assert t.dtype == w.dtype and t.shape == w.shape, name
                            assert torch.equal(t, w), (layout.describe(), tp, pp, ep, name)
                            checked += 1
    assert checked > 0
    return checked


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rank_shards_equal_converter_files(arch, tmp_path):
    hf = make_random_hf_model(arch, tmp_path / "hf", seed=1)
    _check_equal_to_converter(hf, tmp_path)


@pytest.mark.parametrize("arch", FUSED)
def test_rank_shards_from_fused_experts(arch, tmp_path):
    hf = make_random_hf_model(arch, tmp_path / "hf", seed=2, fused_experts=True)
    _check_equal_to_converter(hf, tmp_path)


def test_rank_shards_cast_like_the_converter(tmp_path):
    hf = make_random_hf_model("Qwen2ForCausalLM", tmp_path / "hf", seed=3)
    _check_equal_to_converter(hf, tmp_path, params_dtype=torch.bfloat16, on_disk=True)


def test_runs_group_consecutive_rows():
    # fused QKV of 4 q heads, 2 groups, head_dim 1, TP rank 1: [q3 q4 k2 v2] + 2 padding rows
    assert _runs([3, 4, 6, 8, 0, 0], [0, 4, 6]) == [(0, 2, 2), (1, 1, 1), (2, 1, 1),
                                                     (-1, 0, 2)]
    assert _runs([1, 2, 3], [0]) == [(0, 0, 3)]


def test_hf_dir_detection_and_load_problems(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert is_hf_model_dir(hf) and describe_load_problem(hf) is None
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1\n")
    (ckpt / "config.json").write_text("{}")
    assert not is_hf_model_dir(ckpt) and describe_load_problem(ckpt) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    problem = describe_load_problem(empty)
    assert "neither a Megatron checkpoint" in problem and "config.json" in problem
    assert "does not exist" in describe_load_problem(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    assert "is a file" in describe_load_problem(tmp_path / "file")


def test_fingerprint_reads_headers_and_sees_changes(tmp_path):
    hf = make_random_hf_model("LlamaForCausalLM", tmp_path / "hf", seed=0)
    first = hf_fingerprint(hf)
    assert first == hf_fingerprint(hf) and set(first["files"]) >= {"config.json",
                                                                   "model.safetensors"}
    assert check_same_source(first) is None
    config = json.loads((hf / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (hf / "config.json").write_text(json.dumps(config))
    problem = check_same_source(first)
    assert problem is not None and "config.json" in problem


def test_a_non_finite_weight_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = make_random_hf_model("LlamaForCausalLM", tmp_path / "hf", seed=4)
    state = load_file(str(hf / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    layout = ParallelLayout(2, 1)
    meta, source = hf_checkpoint_metadata(hf, layout, log=lambda m: None)
    spec, shape = shape_of(meta.hf_config)
    ctx = ShardContext(shape, 2, meta.padded_vocab_size)
    with pytest.raises(ValueError, match=r"decoder\.layers\.1\.mlp\.linear_fc2\.weight holds "
                                         r"non-finite values \(1 NaN"):
        for tp in range(2):
            rank_state(source, spec, shape, layout, ctx, tp, 0, 0, torch.float32)
