"""Training runs that used to go silently wrong (issue 11's fault table), reproduced as users hit
them: each now stops at start with an error naming the file and the fix, or says what it does."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sft_testing import REPO, run_tool, run_torchrun, train_cli_args
from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.bridge.random_hf_model import make_random_hf_model
from megatron.sft.data.sft_dataset import SFTDatasetConfig, build_sft_datasets
from megatron.sft.data.validation import DataValidationError
from megatron.sft.runtime.locks import lock_path, this_host
from megatron.sft.training.run_guard import check_training_data

TRAIN = REPO / "tools" / "train_sft.py"
SUFFIXES = ["_text_document.bin", "_text_document.idx", "_loss_mask_document.bin",
            "_loss_mask_document.idx", "_stats.json"]


@pytest.fixture(scope="module")
def ckpt(sft_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("guards") / "tp1pp1"
    convert_hf_to_megatron(sft_assets["hf"], out, ConvertOptions(progress=False))
    return str(out)


def _stats(prefix):
    return json.loads(Path(prefix + "_stats.json").read_text())


def _copy_data(src, dst, suffixes=SUFFIXES):
    for suffix in suffixes:
        shutil.copy2(src + suffix, str(dst) + suffix)
    return str(dst)


def _args(ckpt, data, **extra):
    return train_cli_args(ckpt, data, train_iters=2, **extra)


def _fake_trainer(ds, vocab, padded, mpe=4096, strict=False, save=None):
    """What ``check_training_data`` reads from a Trainer, without a process group."""
    logs = []
    cfg = SimpleNamespace(load="CKPT", strict=strict, seq_length=ds.config.seq_length, save=save,
                          data_path=ds.prefix, valid_data_path=None)
    return SimpleNamespace(cfg=cfg, shape=SimpleNamespace(vocab_size=vocab,
                                                          max_position_embeddings=mpe),
                           meta=SimpleNamespace(padded_vocab_size=padded), train_ds=ds,
                           valid_ds=None, log=logs.append, logs=logs)


# --- two runs, one --save ---------------------------------------------------------------------
@pytest.mark.xdist_group("multiprocess")
def test_second_run_on_the_same_save_fails_at_start_naming_the_first(ckpt, sft_assets, tmp_path):
    """Was: ranks of both runs wrote into one complete-looking iter_...; one crashed, one exit 0.
    Also: a checkpoint save killed earlier (iter_*.partial) and its lock file are cleaned up."""
    save = tmp_path / "run"
    (save / "iter_0000007.partial" / "mp_rank_00").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(save).write_text(json.dumps({"host": this_host(), "pid": dead.pid,
                                           "purpose": "training run"}))
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, str(TRAIN), *_args(ckpt, sft_assets["data"], **{
        "--train-iters": "100000", "--save": str(save)})], stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                 PYTHONUNBUFFERED="1"))
    try:
        deadline = time.time() + 180
        # Wait for a first step: the run then holds the lock and handles SIGTERM by saving.
        while "iter 1/" not in (tmp_path / "first.log").read_text():
            assert first.poll() is None and time.time() < deadline, \
                (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        assert json.loads(lock_path(save).read_text())["pid"] == first.pid
        # Paused, the first run keeps its lock and leaves both cores to the second.
        first.send_signal(signal.SIGSTOP)
        t0 = time.time()
        second = run_torchrun(2, TRAIN, *_args(ckpt, sft_assets["data"], **{"--save": str(save)}),
                              timeout=180)
        text = second.stdout + second.stderr
        assert second.returncode != 0, text[-3000:]
        assert f"{save} is in use by another training run: host {this_host()}, pid {first.pid}" \
            in text
        assert text.count("error: ") >= 2  # both ranks stopped with the error, neither hung
        assert sorted(p.name for p in save.iterdir()) == ["run_metadata.json"]
        run_meta = json.loads((save / "run_metadata.json").read_text())
        assert run_meta["pid"] == first.pid and run_meta["objective"] == "assistant-only"
        print(f"second run refused in {time.time() - t0:.1f}s")
    finally:
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
        log.close()
    out = (tmp_path / "first.log").read_text()
    assert first.returncode == 75, out[-3000:]  # saved and stopped early: run again to resume
    assert f"taking over the lock {lock_path(save)}" in out and f"pid {dead.pid}" in out
    assert "removed 1 unfinished output(s)" in out and "iter_0000007.partial" in out
    assert "training objective: assistant-only" in out
    saved = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert (save / f"iter_{saved:07d}" / "mp_rank_00" / "model_optim_rng.pt").exists()
    assert not list(save.glob("*.partial")) and not lock_path(save).exists()


# --- token ids past the model's vocabulary ----------------------------------------------------
@pytest.mark.xdist_group("multiprocess")
def test_token_ids_past_the_vocabulary_stop_before_any_step(sft_assets, tmp_path):
    """Was: TP2 'loss is inf ... lower --lr', TP1 IndexError, and with --skip-nan-steps exit 0,
    infinite loss, checkpoint saved."""
    max_id = _stats(sft_assets["data"])["max_token_id"]
    small = make_random_hf_model("Qwen2ForCausalLM", tmp_path / "small_hf", seed=0,
                                 overrides=dict(vocab_size=max_id))
    small_ckpt = tmp_path / "small"
    convert_hf_to_megatron(small, small_ckpt, ConvertOptions(progress=False))
    save = tmp_path / "run"
    r = run_tool("tools/train_sft.py", *_args(str(small_ckpt), sft_assets["data"], **{
        "--skip-nan-steps": None, "--save": str(save)}))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"error: {sft_assets['data']}_text_document.bin: sample " in r.stderr
    padded = -(-max_id // 128) * 128
    assert (f"holds token id {max_id}, but the model in {small_ckpt} has a vocabulary of "
            f"{max_id} tokens (embedding padded to {padded})") in r.stderr
    assert f"the data was tokenized with {sft_assets['tokenizer']} (" in r.stderr
    assert "re-tokenize it with the model's own tokenizer" in r.stderr
    assert not save.exists() and not lock_path(save).exists()  # nothing trained, nothing saved


def test_without_stats_each_row_is_checked(sft_assets, tmp_path):
    """Data from another pre-tokenizer (no max_token_id): the per-row backstop names the sample."""
    max_id = _stats(sft_assets["data"])["max_token_id"]
    data = _copy_data(sft_assets["data"], tmp_path / "ds", SUFFIXES[:4])
    train, _, _ = build_sft_datasets(SFTDatasetConfig(data_path=data, seq_length=128,
                                                      split="100,0,0"))
    trainer = _fake_trainer(train, vocab=max_id, padded=128)
    check_training_data(trainer)
    assert any("does not record the largest token id" in m for m in trainer.logs)
    with pytest.raises(DataValidationError, match=rf"{data}_text_document.bin: sample \d+ holds "
                                                  rf"token id {max_id}, but the model in CKPT"):
        for row in range(len(train)):
            train[row]


# --- truncated .bin ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["_text_document", "_loss_mask_document"])
def test_truncated_bin_is_refused_at_open(sft_assets, tmp_path, which):
    """Was: not noticed at open; died mid-run, after saving checkpoints, with 'buffer is smaller
    than requested size' naming no file."""
    data = _copy_data(sft_assets["data"], tmp_path / "ds")
    path = Path(data + which + ".bin")
    size = path.stat().st_size
    os.truncate(path, size - 3)
    with pytest.raises(DataValidationError) as err:
        build_sft_datasets(SFTDatasetConfig(data_path=data, seq_length=128))
    message = str(err.value)
    assert f"{path} is {size - 3} bytes but {data}{which}.idx describes 400 samples" in message
    assert f"needing {size} bytes" in message and "truncated (3 bytes missing" in message
    assert "re-run the pre-tokenization" in message


# --- samples longer than max_position_embeddings ---------------------------------------------
def test_samples_longer_than_the_model_warn_or_fail_with_strict(sft_assets, tmp_path):
    """Was: trained silently."""
    train, _, _ = build_sft_datasets(SFTDatasetConfig(data_path=sft_assets["data"],
                                                      seq_length=128, split="100,0,0"))
    vocab = _stats(sft_assets["data"])["tokenizer_vocab_size"]
    longer = int((train.positions > 50).sum())
    assert 0 < longer < len(train.positions)
    trainer = _fake_trainer(train, vocab, 128, mpe=50)
    check_training_data(trainer)
    warning = [m for m in trainer.logs if "max_position_embeddings" in m]
    assert warning == [
        f"warning: {train.prefix}: {longer} of {len(train.positions)} train samples are longer "
        f"than the model's max_position_embeddings 50 (longest {int(train.positions.max()) + 1} "
        "tokens, --seq-length 128). RoPE models can extrapolate past it, but quality there is "
        "not guaranteed; use --seq-length 50 to skip such samples (samples longer than "
        "--seq-length are left out); --strict makes this an error"]
    with pytest.raises(DataValidationError, match=rf"{longer} of .* --strict makes this an error"):
        check_training_data(_fake_trainer(train, vocab, 128, mpe=50, strict=True))
    quiet = _fake_trainer(train, vocab, 128, mpe=4096, strict=True)
    check_training_data(quiet)
    assert not [m for m in quiet.logs if m.startswith("warning")]


# --- the objective ----------------------------------------------------------------------------
def test_objective_is_printed_and_recorded(sft_assets, tmp_path):
    """Was: --data-path without a _loss_mask_document trained on every token, unsaid. (The real
    trainer's wiring of this log line and file is exercised by the two-runs test above.)"""
    data = _copy_data(sft_assets["data"], tmp_path / "text_only", SUFFIXES[:2])
    vocab = _stats(sft_assets["data"])["tokenizer_vocab_size"]
    train, _, _ = build_sft_datasets(SFTDatasetConfig(data_path=data, seq_length=128,
                                                      split="100,0,0"))
    trainer = _fake_trainer(train, vocab, 512, save=str(tmp_path / "pretrain_run"))
    record = check_training_data(trainer)
    assert (f"training objective: every token (continued pretraining): {data} has no "
            "_loss_mask_document.bin/.idx, so the loss covers all tokens, prompts included. "
            "For assistant-only SFT, pre-tokenize with scripts/data/tokenize_dataset.sh"
            ) in trainer.logs
    meta = json.loads((tmp_path / "pretrain_run" / "run_metadata.json").read_text())
    # the latest run at the top level, every (re)start of the run under "runs"
    assert {k: v for k, v in meta.items() if k != "runs"} == record and meta["runs"] == [record]
    assert meta["objective"] == "every-token" and meta["loss_mask"] is None

    train, _, _ = build_sft_datasets(SFTDatasetConfig(data_path=sft_assets["data"],
                                                      seq_length=128, split="100,0,0"))
    trainer = _fake_trainer(train, vocab, 512, save=str(tmp_path / "sft_run"))
    record = check_training_data(trainer)
    stats = _stats(sft_assets["data"])
    assert (f"training objective: assistant-only: loss on the tokens marked in "
            f"{sft_assets['data']}_loss_mask_document ({stats['loss_tokens']} of "
            f"{stats['tokens']} tokens)") in trainer.logs
    meta = json.loads((tmp_path / "sft_run" / "run_metadata.json").read_text())
    assert meta["objective"] == "assistant-only"
    assert meta["loss_mask"] == sft_assets["data"] + "_loss_mask_document"
