"""Conversions never destroy their input, clean up after killed runs, and export only a
tokenizer that fits the model (rows of issue 11's fault table, reproduced as users hit them)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from sft_testing import REPO, run_tool
from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
from megatron.sft.bridge.random_hf_model import make_random_hf_model
from megatron.sft.bridge.reshard import reshard_checkpoint
from megatron.sft.runtime.layout import ParallelLayout
from megatron.sft.runtime.locks import lock_path, partial_name, this_host


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def qwen2(tiny_hf_models, tmp_path):
    dst = tmp_path / "models" / "qwen2"
    shutil.copytree(tiny_hf_models["Qwen2ForCausalLM"], dst)
    return dst


def test_force_convert_onto_its_own_input_is_refused(qwen2, tmp_path):
    """Was: FORCE=1 convert_hf_to_megatron.sh HF_DIR 1 1 HF_DIR deleted the model, exit 0."""
    before = _digest(qwen2)
    r = run_tool("scripts/checkpoints/convert_hf_to_megatron.sh", str(qwen2), "1", "1",
                 str(qwen2), env={"FORCE": "1"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"--save-dir {qwen2} is the same directory as the input --load-dir {qwen2}" in r.stderr
    assert "even with --force/FORCE=1" in r.stderr and "Traceback" not in r.stderr
    # One inside the other, either way round, through the library (what the script calls).
    for out in (qwen2 / "megatron", qwen2.parent):
        with pytest.raises(ValueError, match="destroy the input"):
            convert_hf_to_megatron(qwen2, out, ConvertOptions(force=True, progress=False))
    assert _digest(qwen2) == before
    assert sorted(p.name for p in qwen2.parent.iterdir()) == ["qwen2"]  # no lock, no partial

    ckpt = tmp_path / "ckpt"
    convert_hf_to_megatron(qwen2, ckpt, ConvertOptions(progress=False))
    ckpt_before = _digest(ckpt)
    with pytest.raises(ValueError, match="--save-dir .* is inside the input --hf-reference"):
        export_megatron_to_hf(ckpt, qwen2 / "export", qwen2, ExportOptions(force=True,
                                                                         progress=False))
    with pytest.raises(ValueError, match="is the same directory as the input --load-dir"):
        export_megatron_to_hf(ckpt, ckpt, None, ExportOptions(force=True, progress=False))
    with pytest.raises(ValueError, match="is the same directory as the input --load-dir"):
        reshard_checkpoint(ckpt, ckpt, ParallelLayout(2, 1), force=True, progress=False)
    assert _digest(qwen2) == before and _digest(ckpt) == ckpt_before


_SLOW_CONVERT = """
import sys, time
from megatron.sft.bridge import checkpoint_io
from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.runtime.layout import ParallelLayout
real = checkpoint_io.torch.save
def save_then_hang(obj, path):
    real(obj, path)
    print("saved", flush=True)
    time.sleep(600)
checkpoint_io.torch.save = save_then_hang
convert_hf_to_megatron(sys.argv[1], sys.argv[2],
                       ConvertOptions(layout=ParallelLayout(2, 1), progress=False))
"""


def test_partial_of_a_killed_conversion_is_removed_by_the_next(qwen2, tmp_path, capfd):
    """Was: SIGKILL mid-conversion left OUT.partial-PID forever."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(qwen2), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout.readline().strip() == "saved", proc.communicate(timeout=60)[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_partial = out.with_name(f"out.partial-{this_host()}-{proc.pid}")
    assert killed_partial.is_dir() and lock_path(out).exists() and not out.exists()
    live_partial = tmp_path / partial_name("other")  # a live writer's (ours): must stay
    live_partial.mkdir()

    convert_hf_to_megatron(qwen2, out, ConvertOptions(progress=False))
    err = capfd.readouterr().err
    assert f"taking over the lock {lock_path(out)}" in err and f"pid {proc.pid}" in err
    assert f"removed 1 unfinished output(s) left in {tmp_path}" in err
    assert killed_partial.name in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["models", "out", live_partial.name])  # no partial, no lock left
    assert (out / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").exists()


def test_concurrent_conversion_to_the_same_output_is_refused(qwen2, tmp_path):
    from megatron.sft.runtime.locks import DirectoryLock, LockedError

    out = tmp_path / "out"
    with DirectoryLock.acquire(out, "conversion"):  # flock: a second open file conflicts
        with pytest.raises(LockedError, match=f"{out} is in use by another conversion: host "
                                              f"{this_host()}, pid {os.getpid()}"):
            convert_hf_to_megatron(qwen2, out, ConvertOptions(progress=False, force=True))
        assert lock_path(out).exists()  # the refused writer leaves the holder's lock alone
    assert not out.exists() and not lock_path(out).exists()


def test_export_refuses_a_tokenizer_larger_than_the_model(sft_assets, tmp_path):
    """Was: merge_and_export.sh with a reference whose tokenizer has more tokens than the
    model's embedding rows exported silently."""
    from transformers import AutoTokenizer

    tokens = len(AutoTokenizer.from_pretrained(sft_assets["tokenizer"]))
    small = make_random_hf_model("Qwen2ForCausalLM", tmp_path / "small", seed=0,
                                 overrides=dict(vocab_size=tokens - 20))
    ref = tmp_path / "ref"
    shutil.copytree(small, ref)
    for f in sft_assets["tokenizer"].iterdir():
        shutil.copy2(f, ref / f.name)
    ckpt = tmp_path / "ckpt"
    convert_hf_to_megatron(small, ckpt, ConvertOptions(progress=False))
    r = run_tool("scripts/checkpoints/merge_and_export.sh", str(ckpt), str(ref),
                 str(tmp_path / "export"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert (f"the tokenizer in {ref} has {tokens} tokens but the model has only {tokens - 20} "
            f"embedding rows") in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ref", "small"]

    # A tokenizer no larger than the model is fine (extra rows are padding).
    shutil.copytree(sft_assets["hf"], tmp_path / "ref_ok")
    for f in sft_assets["tokenizer"].iterdir():
        shutil.copy2(f, tmp_path / "ref_ok" / f.name)
    ok_ckpt = tmp_path / "ok_ckpt"
    convert_hf_to_megatron(sft_assets["hf"], ok_ckpt, ConvertOptions(progress=False))
    out = export_megatron_to_hf(ok_ckpt, tmp_path / "export", tmp_path / "ref_ok",
                                ExportOptions(progress=False))
    assert (out / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == tokens
