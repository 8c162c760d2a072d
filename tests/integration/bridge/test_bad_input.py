"""Bad input: a clear error before anything is written, and nothing left behind."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sft_testing import run_tool
from megatron.sft.bridge import checkpoint_io
from megatron.sft.bridge.checkpoint_io import CheckpointError
from megatron.sft.bridge.convert import ConvertOptions, CoverageError, convert_hf_to_megatron
from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
from megatron.sft.runtime.layout import LayoutError, ParallelLayout
from megatron.sft.bridge.model_shape import UnsupportedModelError


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(name)]


@pytest.fixture
def qwen2(tiny_hf_models, tmp_path):
    dst = tmp_path / "qwen2"
    shutil.copytree(tiny_hf_models["Qwen2ForCausalLM"], dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture_lists_supported(qwen2, tmp_path):
    _edit_config(qwen2, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError, match="Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        convert_hf_to_megatron(qwen2, tmp_path / "out", ConvertOptions(progress=False))
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("layout, message", [
    (ParallelLayout(3, 1), "TP=3 does not divide num_attention_heads=4"),
    (ParallelLayout(1, 3), "PP=3 does not divide num_hidden_layers=4"),
    (ParallelLayout(1, 2, 4), "PP=2 x VPP=4 does not divide num_hidden_layers=4"),
])
def test_impossible_layouts(qwen2, tmp_path, layout, message):
    with pytest.raises(LayoutError, match=message.replace("=", "=").replace("x", "x")):
        convert_hf_to_megatron(qwen2, tmp_path / "out", ConvertOptions(layout=layout,
                                                                       progress=False))
    assert _leftovers(tmp_path, "out") == []


def test_missing_and_unexpected_tensors(qwen2, tmp_path):
    tensors = load_file(qwen2 / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    tensors["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(tensors, qwen2 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CoverageError, match=r"missing 1 tensor\(s\): model.layers.2.mlp.up_proj"
                                            r".*unexpected 1 tensor\(s\): model.layers.9.extra"):
        convert_hf_to_megatron(qwen2, tmp_path / "out", ConvertOptions(progress=False))
    assert _leftovers(tmp_path, "out") == []


def test_mismatched_shape_is_caught_before_writing(qwen2, tmp_path):
    tensors = load_file(qwen2 / "model.safetensors")
    tensors["model.layers.3.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    save_file(tensors, qwen2 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CoverageError, match=r"1 with the wrong shape: model.layers.3.self_attn."
                                            r"k_proj.weight has shape \(48, 64\), expected \(32, 64\)"):
        convert_hf_to_megatron(qwen2, tmp_path / "out", ConvertOptions(layout=ParallelLayout(1, 2),
                                                                       progress=False))
    assert _leftovers(tmp_path, "out") == []


def test_existing_output_needs_force(qwen2, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        convert_hf_to_megatron(qwen2, out, ConvertOptions(progress=False))
    assert (out / "precious.txt").read_text() == "keep me"
    convert_hf_to_megatron(qwen2, out, ConvertOptions(progress=False, force=True))
    assert not (out / "precious.txt").exists()
    assert (out / "latest_checkpointed_iteration.txt").exists()


def test_interrupted_conversion_leaves_nothing(qwen2, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = checkpoint_io.torch.save

    def save_then_interrupt(obj, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(checkpoint_io.torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_hf_to_megatron(qwen2, tmp_path / "out", ConvertOptions(layout=ParallelLayout(2, 2),
                                                                       progress=False))
    assert calls["n"] == 3
    assert _leftovers(tmp_path, "out") == []


def test_export_errors(qwen2, tiny_hf_models, tmp_path):
    ckpt = tmp_path / "ckpt"
    convert_hf_to_megatron(qwen2, ckpt, ConvertOptions(layout=ParallelLayout(2, 1), progress=False))
    # A reference that is a different model.
    with pytest.raises(CheckpointError, match="different model.*Qwen2ForCausalLM vs LlamaForCausalLM"):
        export_megatron_to_hf(ckpt, tmp_path / "hf", tiny_hf_models["LlamaForCausalLM"],
                              ExportOptions(progress=False))
    # Iteration that does not exist.
    with pytest.raises(CheckpointError, match="iter_0000007 does not exist.*iter_0000001"):
        export_megatron_to_hf(ckpt, tmp_path / "hf", qwen2, ExportOptions(iteration=7,
                                                                          progress=False))
    # Incomplete checkpoint: a rank file is gone.
    (ckpt / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt").unlink()
    with pytest.raises(CheckpointError, match="mp_rank_01/model_optim_rng.pt is missing"):
        export_megatron_to_hf(ckpt, tmp_path / "hf", qwen2, ExportOptions(progress=False))
    # Not a checkpoint at all.
    with pytest.raises(CheckpointError, match="no latest_checkpointed_iteration.txt"):
        export_megatron_to_hf(qwen2, tmp_path / "hf", None, ExportOptions(progress=False))
    assert _leftovers(tmp_path, "hf") == []


def test_cli_reports_user_errors_without_traceback(qwen2, tmp_path):
    r = run_tool("scripts/checkpoints/convert_hf_to_megatron.sh", str(qwen2), "3", "1",
                 str(tmp_path / "out"))
    assert r.returncode == 2
    assert "error: cannot shard this model: TP=3 does not divide" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    r = run_tool("scripts/checkpoints/convert_hf_to_megatron.sh")
    assert r.returncode == 2 and "Usage" in r.stdout
    r = run_tool("scripts/checkpoints/convert_deepseek_r1_to_megatron.sh", "3B", "1", "1")
    assert r.returncode == 2 and "SIZE must be one of" in r.stderr


def test_download_script_fails_clearly_offline(tmp_path):
    r = run_tool("scripts/checkpoints/download_hf_models.py", "--model-card", "org/model",
                 "--output-dir", str(tmp_path / "m"), env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1
    assert "could not download org/model" in r.stderr and "Offline?" in r.stderr
    assert _leftovers(tmp_path, "m") == [] or _leftovers(tmp_path, "m") == ["m.partial"]


def test_download_script_accepts_local_directory(qwen2, tmp_path):
    r = run_tool("scripts/checkpoints/download_hf_models.py", "--model-card", str(qwen2),
                 env={"ASSETS_DIR": str(tmp_path / "assets")})
    assert r.returncode == 0, r.stderr
    out = tmp_path / "assets" / "checkpoints" / "qwen2"
    assert (out / "model.safetensors").read_bytes() == (qwen2 / "model.safetensors").read_bytes()
    assert "Qwen2ForCausalLM, ready" in r.stdout
