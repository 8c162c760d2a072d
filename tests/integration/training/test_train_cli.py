"""tools/train_sft.py as a user runs it: preemption, divergence, bad flags, logs and plots."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _slurm_job(tmp_path, **env):
    """``bash scripts/sft/slurm/submit.sbatch`` as Slurm would start it on 2 nodes, on this
    machine: Slurm's variables set, srun and scontrol replaced by local stand-ins."""
    from megatron.sft.runtime.ports import free_port

    srun, scontrol = tmp_path / "srun", tmp_path / "scontrol"
    srun.write_text(f"#!/bin/bash\nexec {sys.executable} "
                    f"{REPO}/tests/integration/training/srun_stand_in.py \"$@\"\n")
    scontrol.write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    srun.chmod(0o755)
    scontrol.chmod(0o755)
    full = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1", PYTHON=sys.executable, REPO=str(REPO),
                RECIPE="scripts/sft/SFT_tiny_cpu.sh", SRUN=str(srun), SCONTROL=str(scontrol),
                SLURM_NNODES="2", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GPUS_PER_NODE="1",
                TP="1", SEQ_LEN="128", MBS="2", GBS="4", TRAIN_ITERS="8", LR="1e-3",
                LR_WARMUP_ITERS="1", **env)
    return subprocess.Popen(["bash", str(REPO / "scripts/sft/slurm/submit.sbatch")], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _lr(step, max_lr=1e-3, min_lr=1e-4, warmup=4, decay=32):
    """megatron-core's cosine schedule by hand (steps are samples)."""
    import math

    if step <= warmup:
        return max_lr * step / warmup
    return min_lr + 0.5 * (math.cos(math.pi * (step - warmup) / (decay - warmup)) + 1) * \
        (max_lr - min_lr)


@pytest.mark.xdist_group("multiprocess")
def test_a_slurm_job_saves_at_the_warning_requeues_resumes_and_a_hang_requeues(ckpt, sft_assets,
                                                                               tmp_path):
    """Two "nodes" of one rank each. Job 1 gets Slurm's time-limit warning (SIGUSR1 to the batch
    script) mid-run: every rank saves the same iteration, exits 75, the job is requeued. The
    requeued job resumes exactly there; then rank 1 stalls in a step while rank 0 waits in the
    gradient all-reduce: the watchdog names both, stops them (76), nothing is saved, requeued."""
    save = tmp_path / "run"
    paths = dict(CKPT=ckpt, DATA_PATH=sft_assets["data"], SAVE_DIR=str(save))
    # rank 1 pauses 5 s in iteration 4, so the warning lands by then however fast the steps
    # are and the save is at 5 at the latest (the stop is agreed on at an iteration's start);
    # unpaused, a loaded CI machine once saved at 7, leaving no iteration for the hang below
    # (the pause is the watchdog's test hook, live with --hang-timeout-minutes; 1 min is far
    # above the pause)
    job = _slurm_job(tmp_path, **paths, MEGATRON_SFT_TEST_HANG="1:4:5",
                     EXTRA_ARGS="--hang-timeout-minutes 1")
    log = Path(str(save) + ".log.jsonl")
    deadline = time.time() + 240
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert job.poll() is None and time.time() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)  # Slurm's --signal=B:USR1@300
    out = job.communicate(timeout=240)[0]
    assert job.returncode == 0, out[-3000:]
    assert "received SIGUSR1: asking every rank to save and exit" in out
    assert "received signal 10: saving and exiting" in out
    assert "stopped before the end, after saving (exit 75)" in out
    assert "exit 75: requeueing job 4242" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    saved = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved <= 5 and not list(save.glob("*.partial*"))
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == \
        list(range(1, saved + 1))  # both ranks stopped after the same iteration

    hang = saved + 2
    job = _slurm_job(tmp_path, **paths, SLURM_RESTART_COUNT="1",
                     EXTRA_ARGS="--hang-timeout-minutes 0.1",
                     MEGATRON_SFT_TEST_HANG=f"1:{hang}:120")
    t0 = time.time()
    out = job.communicate(timeout=240)[0]
    assert job.returncode == 0, out[-3000:]
    assert f"resumed from {save} at iteration {saved}, data row {saved * 4}" in out
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, hang))
    assert records[-1]["lr"] == pytest.approx(_lr((saved + 1) * 4), rel=1e-9)
    report = re.search(r"hang: no training step finished for 0.1 min \(--hang-timeout-minutes "
                       r"0.1\); last reports: (.*)\. Stopping every rank \(exit 76\)", out)
    assert report, out[-3000:]
    reports = report.group(1)
    assert re.fullmatch(rf"ranks 0-1: iteration {hang}, forward-backward, \d+ s ago", reports) or \
        re.fullmatch(rf"rank 0: iteration {hang}, forward-backward, \d+ s ago; rank 1: "
                     rf"iteration {hang}, forward-backward, \d+ s ago", reports), reports
    assert "stopped by the hang watchdog (exit 76)" in out and "exit 76: requeueing" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n" * 2
    assert int((save / "latest_checkpointed_iteration.txt").read_text()) == saved
    assert not list(save.glob("iter_*.partial*"))
    print(f"hang stopped in {time.time() - t0:.0f}s (setup included)")


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
