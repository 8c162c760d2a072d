"""HF -> Megatron -> HF is lossless; the CLI scripts do what the README says."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sft_testing import ARCHITECTURES, run_tool
from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
from megatron.sft.runtime.layout import ParallelLayout
from megatron.sft.bridge.reshard import reshard_checkpoint


def _hf_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_identical(a_dir, b_dir):
    a, b = _hf_tensors(a_dir), _hf_tensors(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tp2pp2_roundtrip_is_bit_identical(arch, tiny_hf_models, tmp_path):
    src = tiny_hf_models[arch]
    convert_hf_to_megatron(src, tmp_path / "mg", ConvertOptions(layout=ParallelLayout(2, 2),
                                                                progress=False))
    export_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", src, ExportOptions(progress=False))
    _assert_identical(src, tmp_path / "hf")
    # Rank files hold only their shard: no TP slice may drag its whole parent storage along.
    for f in (tmp_path / "mg").rglob("model_optim_rng.pt"):
        for name, t in torch.load(f, weights_only=True)["model"].items():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (f, name)
    assert json.loads((src / "config.json").read_text()) == \
        json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (tmp_path / "hf" / "generation_config.json").exists()


def test_vpp_and_reshard_roundtrips(tiny_hf_models, tmp_path):
    src = tiny_hf_models["LlamaForCausalLM"]
    convert_hf_to_megatron(src, tmp_path / "vpp", ConvertOptions(layout=ParallelLayout(2, 2, 2),
                                                                 progress=False))
    state = torch.load(tmp_path / "vpp/iter_0000001/mp_rank_01_001/model_optim_rng.pt",
                       weights_only=True)
    assert {"model0", "model1"} <= set(state) and "model" not in state
    reshard_checkpoint(tmp_path / "vpp", tmp_path / "tp1", ParallelLayout(1, 1), progress=False)
    export_megatron_to_hf(tmp_path / "tp1", tmp_path / "hf", src, ExportOptions(progress=False))
    _assert_identical(src, tmp_path / "hf")


def test_sharded_export_with_index_and_dtype(tiny_hf_models, tmp_path):
    src = tiny_hf_models["Qwen2ForCausalLM"]
    convert_hf_to_megatron(src, tmp_path / "mg", ConvertOptions(progress=False))
    export_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", src,
                          ExportOptions(max_shard_size="40KB", dtype=torch.bfloat16,
                                        progress=False))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    got = _hf_tensors(tmp_path / "hf")
    ref = _hf_tensors(src)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in got.values())
    for name, tensor in ref.items():
        assert torch.equal(got[name], tensor.to(torch.bfloat16)), name
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.bfloat16


def test_shell_scripts_convert_and_export(tiny_hf_models, tmp_path):
    hf = tmp_path / "deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B"
    import shutil

    shutil.copytree(tiny_hf_models["Qwen2ForCausalLM"], hf)
    (hf / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    env = {"ASSETS_DIR": str(tmp_path.parent / tmp_path.name)}
    (tmp_path / "checkpoints").mkdir()
    shutil.move(str(hf), tmp_path / "checkpoints" / hf.name)
    hf = tmp_path / "checkpoints" / hf.name
    r = run_tool("scripts/checkpoints/convert_deepseek_r1_to_megatron.sh", "1.5B", "2", "1",
                 env=env)
    assert r.returncode == 0, r.stderr
    ckpt = hf.parent / (hf.name + "_Megatron_TP2PP1")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (ckpt / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt").exists()
    r = run_tool("scripts/checkpoints/merge_and_export.sh", str(ckpt), str(hf),
                 str(tmp_path / "export"))
    assert r.returncode == 0, r.stderr
    _assert_identical(hf, tmp_path / "export")
    assert (tmp_path / "export" / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
