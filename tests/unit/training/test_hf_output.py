"""``--save-hf`` guards and ``SAVE/hf_reference`` (training/hf_output.py), without a process
group: a foreign output directory is refused, this run's previous export is not; the reference
files are the HF directory's config and tokenizer, never its weights."""

import json
from types import SimpleNamespace

import pytest

from megatron.sft.training.hf_output import (
    EXPORT_MARKER,
    REFERENCE_DIR,
    check_hf_outputs,
    reference_dir,
    save_reference_files,
)


def _cfg(tmp_path, **extra):
    return SimpleNamespace(**{"load": str(tmp_path / "hf"), "save": str(tmp_path / "run"),
                              "save_hf": str(tmp_path / "out"), "save_hf_adapter": None,
                              **extra})


def test_save_hf_refuses_a_directory_it_did_not_export(tmp_path):
    cfg = _cfg(tmp_path)
    check_hf_outputs(cfg)  # absent: fine
    out = tmp_path / "out"
    out.mkdir()
    check_hf_outputs(cfg)  # empty: fine
    (out / "model.safetensors").write_text("someone else's")
    with pytest.raises(ValueError, match="--save-hf .* already holds files that this run did "
                                         "not export"):
        check_hf_outputs(cfg)
    (out / EXPORT_MARKER).write_text(json.dumps({"checkpoint": str((tmp_path / "run")
                                                                   .resolve()), "iteration": 2}))
    check_hf_outputs(cfg)  # this --save's export: replaced at the next one


def test_save_hf_must_not_overlap_inputs_or_save(tmp_path):
    with pytest.raises(ValueError, match="--save-hf"):
        check_hf_outputs(_cfg(tmp_path, save_hf=str(tmp_path / "run" / "hf")))
    with pytest.raises(ValueError, match="--save-hf-adapter"):
        check_hf_outputs(_cfg(tmp_path, save_hf=None, save_hf_adapter=str(tmp_path / "hf")))


def test_reference_files_are_config_and_tokenizer_not_weights(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "tokenizer.json", "generation_config.json",
                 "model.safetensors", "model.safetensors.index.json"):
        (hf / name).write_text("{}")
    run = tmp_path / "run"
    assert reference_dir(run) is None
    assert save_reference_files(hf, run) == run / REFERENCE_DIR
    assert sorted(p.name for p in (run / REFERENCE_DIR).iterdir()) == [
        "config.json", "generation_config.json", "tokenizer.json"]
    assert save_reference_files(hf, run) is None  # once
    assert reference_dir(run) == run / REFERENCE_DIR
    assert save_reference_files(tmp_path / "moved", tmp_path / "run2") is None
