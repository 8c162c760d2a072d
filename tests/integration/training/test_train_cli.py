"""tools/train_sft.py as a user runs it: preemption, divergence, bad flags, logs and plots."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from sft_testing import REPO, run_tool, train_cli_args
from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron


@pytest.fixture(scope="module")
def ckpt(sft_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tp1pp1"
    convert_hf_to_megatron(sft_assets["hf"], out, ConvertOptions(progress=False))
    return str(out)


def _args(ckpt, data, **extra):
    return train_cli_args(ckpt, data, train_iters=3, **extra)


@pytest.mark.xdist_group("multiprocess")
def test_sigterm_saves_then_exits_cleanly(ckpt, sft_assets, tmp_path):
    save = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "tools/train_sft.py"),
                             *_args(ckpt, sft_assets["data"], **{"--train-iters": "100000",
                                                                 "--save": str(save)})],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("iter 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=120)
    text = "".join(lines) + out
    assert proc.returncode == 0, text[-3000:]
    assert "received signal 15: saving and exiting" in text
    saved = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved < 100000
    assert (save / f"iter_{saved:07d}" / "mp_rank_00" / "model_optim_rng.pt").exists()
    assert not list(save.glob("*.partial"))


@pytest.mark.xdist_group("multiprocess")
def test_nan_loss_stops_with_the_iteration_or_is_skipped(ckpt, sft_assets, tmp_path):
    import shutil

    import torch

    bad = tmp_path / "nan_ckpt"
    shutil.copytree(ckpt, bad)
    rank_file = bad / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=True)
    state["model"]["decoder.final_layernorm.weight"][0] = float("nan")
    torch.save(state, rank_file)

    # The edit is a deliberate corruption: --no-verify lets the NaN reach the loss.
    r = run_tool("tools/train_sft.py", *_args(str(bad), sft_assets["data"],
                                              **{"--no-verify": None}), timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "error: loss is nan at iteration 1; stopping" in r.stderr
    assert "--skip-nan-steps" in r.stderr

    log = tmp_path / "log.jsonl"
    r = run_tool("tools/train_sft.py", *_args(str(bad), sft_assets["data"], **{
        "--skip-nan-steps": None, "--log-json": str(log), "--no-verify": None}), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [rec["skipped"] for rec in records] == [True, True, True]


@pytest.mark.xdist_group("multiprocess")
def test_bad_flags_fail_before_training(ckpt, sft_assets, tmp_path):
    r = run_tool("tools/train_sft.py", *_args(ckpt, sft_assets["data"], **{
        "--global-batch-size": "3"}))
    assert r.returncode == 2
    assert "--global-batch-size 3 is not divisible by --micro-batch-size 2" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_tool("tools/train_sft.py", *_args(ckpt, str(tmp_path / "nothing")))
    assert r.returncode == 2 and "no SFT dataset at" in r.stderr


@pytest.mark.xdist_group("multiprocess")
def test_logs_tensorboard_and_plot(ckpt, sft_assets, tmp_path):
    log = tmp_path / "log.jsonl"
    r = run_tool("tools/train_sft.py", *_args(ckpt, sft_assets["data"], **{
        "--tensorboard-dir": str(tmp_path / "tb"), "--log-json": str(log),
        "--eval-interval": "3", "--eval-iters": "1"}), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [rec["iteration"] for rec in records] == [1, 2, 3]
    assert "valid_loss" in records[-1] and records[-1]["valid_ppl"] > 1
    assert "iter 3/3 | loss" in r.stdout
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    png = tmp_path / "curve.png"
    p = run_tool("tools/plot_training_log.py", str(log), str(png))
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_file_mistake_exits_2_naming_the_file_and_key(tmp_path):
    """Was: ``train_iters: "abc"`` went into the config as a string (``lr: 1e-5`` too)."""
    config = tmp_path / "sft.yaml"
    config.write_text("load: /ckpt\nlr: 1e-5\ntrain_iters: abc\n")
    r = run_tool("tools/train_sft.py", "--config", str(config))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (f"error: {config}: key 'train_iters' is 'abc' (a string), but --train-iters takes an "
            "integer or null; write e.g. 'train_iters: 10'") in r.stderr


@pytest.mark.xdist_group("multiprocess")
def test_warmup_past_the_iterations_train_epochs_give_is_refused(ckpt, sft_assets, tmp_path):
    """Was megatron-core's bare ``AssertionError: lr_warmup_steps < lr_decay_steps``; with
    --train-epochs the iteration count is only known once the data is built."""
    args = _args(ckpt, sft_assets["data"], **{"--lr-warmup-iters": "50"})
    i = args.index("--train-iters")
    del args[i:i + 2]
    r = run_tool("tools/train_sft.py", *args, "--train-epochs", "0.1")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "AssertionError" not in r.stderr
    assert re.search(r"error: --lr-warmup-iters 50 is not below the \d+ iteration\(s\) that "
                     r"--train-epochs 0.1 gives: the learning rate would never finish warming "
                     r"up; use --lr-warmup-iters \d+ \(or any value below \d+\), "
                     r"--lr-warmup-fraction 0.1, or train longer", r.stderr), r.stderr[-2000:]


def test_release_tracker_names_the_fix_for_training_and_for_export(ckpt, sft_assets, tmp_path):
    """``latest_checkpointed_iteration.txt`` saying ``release``: training has no --iteration
    flag, export and reshard do; the message must be right for both."""
    import shutil

    from megatron.sft.bridge.checkpoint_io import CheckpointError
    from megatron.sft.lora.merge import open_checkpoint
    from megatron.sft.training.arguments import TrainConfig
    from megatron.sft.training.trainer import Trainer

    release = tmp_path / "release_ckpt"
    shutil.copytree(ckpt, release)
    tracker = release / "latest_checkpointed_iteration.txt"
    iteration = int(tracker.read_text())
    tracker.write_text("release\n")
    expected = (f"{tracker} says 'release' (Megatron-LM's marker for a release/ folder), not an "
                "iteration: export and reshard take --iteration N; for training (which has no "
                f"such flag) write the iteration number into {tracker}")
    trainer = Trainer(TrainConfig(load=str(release), data_path=sft_assets["data"], train_iters=1))
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        trainer.setup()  # the first thing it reads
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        open_checkpoint(release)  # export without --iteration
    assert open_checkpoint(release, iteration).iteration == iteration  # export --iteration N
