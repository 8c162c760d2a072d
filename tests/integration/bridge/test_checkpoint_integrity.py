"""Nothing lost, nothing silently wrong in the converters (issue 17, section 1), each fault made
for real: bytes overwritten inside a weight, a truncated rank file, NaN weights, a full disk
(a tmpfs), a truncated config, mixed source dtypes."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sft_testing import run_tool, small_filesystem
from megatron.sft.bridge.checkpoint_io import CheckpointError, iteration_dir, read_metadata
from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
from megatron.sft.bridge.integrity import CHECKSUMS_FILE, IntegrityError
from megatron.sft.bridge.reshard import reshard_checkpoint
from megatron.sft.runtime.disk import DiskFullError
from megatron.sft.runtime.layout import ParallelLayout

RANK_FILE = "iter_0000001/mp_rank_00/model_optim_rng.pt"


@pytest.fixture
def qwen2(tiny_hf_models, tmp_path):
    dst = tmp_path / "qwen2"
    shutil.copytree(tiny_hf_models["Qwen2ForCausalLM"], dst)
    return dst


@pytest.fixture
def ckpt(qwen2, tmp_path):
    out = tmp_path / "mg"
    convert_hf_to_megatron(qwen2, out, ConvertOptions(progress=False))
    return out


def _left(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(name))


def _overwrite_inside_a_weight(path, nbytes=2048):
    """What the issue did: 2 KB of 0xFF (NaN in fp32) in the middle of the weights' bytes."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start:start + nbytes] = b"\xff" * nbytes
    path.write_bytes(bytes(data))


def test_convert_records_every_files_sha256(ckpt):
    it = iteration_dir(ckpt)
    files = json.loads((it / CHECKSUMS_FILE).read_text())["files"]
    on_disk = sorted(p.relative_to(it).as_posix() for p in it.rglob("*.pt"))
    assert sorted(files) == on_disk
    for name, want in files.items():
        data = (it / name).read_bytes()
        assert want == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert read_metadata(it).producer == "convert"


def test_overwritten_bytes_stop_export_and_reshard_naming_the_file(ckpt, qwen2, tmp_path):
    victim = ckpt / RANK_FILE
    _overwrite_inside_a_weight(victim)
    r = run_tool("scripts/checkpoints/merge_and_export.sh", str(ckpt), str(qwen2),
                 str(tmp_path / "hf"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: {victim} is corrupt: its SHA-256 "), r.stderr
    assert _left(tmp_path, "hf") == []
    with pytest.raises(IntegrityError, match="is corrupt"):
        reshard_checkpoint(ckpt, tmp_path / "tp2", ParallelLayout(2, 1), progress=False)
    assert _left(tmp_path, "tp2") == []
    # Unverified, the NaN the bytes decode to is still refused, naming the tensor.
    r = run_tool("scripts/checkpoints/merge_and_export.sh", str(ckpt), str(qwen2),
                 str(tmp_path / "hf"), env={"NO_VERIFY": "1"})
    assert r.returncode == 2 and "holds non-finite values" in r.stderr, r.stderr[-2000:]
    assert "\nerror: model." in r.stderr and _left(tmp_path, "hf") == []


def test_a_truncated_file_is_one_line_with_or_without_checksums(ckpt, tmp_path):
    victim = ckpt / RANK_FILE
    victim.write_bytes(victim.read_bytes()[:5000])
    with pytest.raises(IntegrityError, match=r"is truncated or was replaced: 5000 bytes, \d+ "
                                             "were written"):
        export_megatron_to_hf(ckpt, tmp_path / "hf", None, ExportOptions(progress=False))
    (iteration_dir(ckpt) / CHECKSUMS_FILE).unlink()  # as a checkpoint from before checksums
    with pytest.raises(CheckpointError, match=rf"{victim} cannot be read \(.*\): the file is "
                                              "truncated or corrupt"):
        export_megatron_to_hf(ckpt, tmp_path / "hf", None, ExportOptions(progress=False))
    assert _left(tmp_path, "hf") == []


def test_nan_weights_are_never_converted(qwen2, tmp_path):
    tensors = load_file(qwen2 / "model.safetensors")
    tensors["model.layers.1.mlp.gate_proj.weight"][3, :2] = float("nan")
    tensors["model.layers.1.mlp.gate_proj.weight"][4, 0] = float("inf")
    save_file(tensors, qwen2 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.gate_proj.weight holds non-finite "
                                         r"values \(2 NaN, 1 inf of \d+\); the HF checkpoint"):
        convert_hf_to_megatron(qwen2, tmp_path / "out", ConvertOptions(progress=False))
    assert _left(tmp_path, "out") == []


def test_mixed_source_dtypes_are_told_and_cast_to_the_majority(qwen2, tmp_path):
    tensors = load_file(qwen2 / "model.safetensors")
    tensors = {k: (v if k == "model.norm.weight" else v.to(torch.bfloat16))
               for k, v in tensors.items()}
    save_file(tensors, qwen2 / "model.safetensors", metadata={"format": "pt"})
    said = []
    meta = convert_hf_to_megatron(qwen2, tmp_path / "out",
                                  ConvertOptions(progress=False, log=said.append))
    assert meta.params_dtype == "bfloat16"
    assert len(said) == 1 and "the HF weights mix dtypes" in said[0]
    assert "1 in float32 (e.g. model.norm.weight)" in said[0] and "PARAMS_DTYPE" in said[0]


def test_truncated_config_and_metadata_name_the_file(qwen2, ckpt, tmp_path):
    text = (qwen2 / "config.json").read_text()
    (qwen2 / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=rf"{qwen2 / 'config.json'} \(HF model config\) is "
                                              "not valid JSON"):
        convert_hf_to_megatron(qwen2, tmp_path / "out", ConvertOptions(progress=False))
    meta = iteration_dir(ckpt) / "sft_metadata.json"
    meta.write_text(meta.read_text()[:40])
    r = run_tool("tools/export_megatron_to_hf.py", "--load-dir", str(ckpt), "--save-dir",
                 str(tmp_path / "hf"), "--no-progress")
    assert r.returncode == 2 and r.stderr.startswith(f"error: {meta} (checkpoint metadata) is "
                                                     "not valid JSON"), r.stderr[-2000:]


def test_a_full_disk_is_one_clear_error_for_convert_and_export(qwen2, ckpt, tmp_path):
    with small_filesystem(tmp_path / "small", "256K") as small:
        with pytest.raises(DiskFullError, match=r"no space left on .*small while writing the "
                                                r"converted checkpoint out: need about "):
            convert_hf_to_megatron(qwen2, small / "out", ConvertOptions(progress=False))
        r = run_tool("scripts/checkpoints/merge_and_export.sh", str(ckpt), str(qwen2),
                     str(small / "hf"))
        assert r.returncode == 2 and r.stderr.startswith("error: no space left on "), r.stderr
        assert "while writing the HF model hf: need about" in r.stderr
        assert sorted(p.name for p in small.iterdir()) == []  # no partial, no lock left


def test_a_write_that_runs_out_of_space_midway_is_translated(tmp_path):
    """The pre-check passes on an estimate; a save that still fails while streaming (here a
    tensor bigger than the disk, saved without the pre-check) is the same one-line error."""
    from megatron.sft.bridge.checkpoint_io import save_rank_state

    with small_filesystem(tmp_path / "small", "128K") as small:
        with pytest.raises(DiskFullError, match="no space left on .* while writing "
                                                "model_optim_rng.pt of iter_0000001.partial"):
            save_rank_state(small / "iter_0000001.partial", ParallelLayout(), 0, 0,
                            {"model": {"w": torch.zeros(100_000)}})
        assert list((small / "iter_0000001.partial").rglob("*.tmp")) == []
