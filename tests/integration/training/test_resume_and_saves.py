"""Resume that does what it says, and saves that lose nothing (issue 17, sections 1 and 2),
each fault made for real: resumed runs with changed flags, a reshard in between, a --save that
is the converted --load, a full disk (tmpfs) during a save and at the restart. One process runs
them all (resume_worker.py); each test below checks one row."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sft_testing import REPO, run_torchrun, small_filesystem
from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron

WORKER = Path(__file__).with_name("resume_worker.py")


@pytest.fixture(scope="module")
def runs(sft_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    ckpt = root / "conv"
    convert_hf_to_megatron(sft_assets["hf"], ckpt, ConvertOptions(progress=False))
    (root / "work").mkdir()
    # a disk smaller than one checkpoint, and one that holds two (the restart)
    with small_filesystem(root / "small_fs", "1M") as small, \
            small_filesystem(root / "restart_fs", "8M") as restart:
        spec = {"out": str(root / "out.json"), "ckpt": str(ckpt), "data": sft_assets["data"],
                "work": str(root / "work"), "small_fs": str(small), "restart_fs": str(restart)}
        (root / "spec.json").write_text(json.dumps(spec))
        proc = run_torchrun(1, WORKER, str(root / "spec.json"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((root / "out.json").read_text())
    crashed = {name: r["traceback"] for name, r in results.items()
               if isinstance(r, dict) and r.get("traceback")}
    assert not crashed, "\n".join(f"{n}:\n{t}" for n, t in crashed.items())
    return results


def _lr(step, max_lr, min_lr, warmup, decay):
    """megatron-core's cosine schedule by hand (steps are samples)."""
    if step <= warmup:
        return max_lr * step / warmup
    if step > decay:
        return min_lr
    ratio = (step - warmup) / (decay - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (max_lr - min_lr)


def test_a_run_at_its_end_says_so_and_saves_nothing(runs):
    assert [h["iteration"] for h in runs["a"]["history"]] == [1, 2, 3, 4]
    done = runs["done"]
    assert done["error"] is None and done["history"] == [] and done["start_iteration"] == 4
    assert any("nothing to train" in m and "--train-iters 4" in m for m in done["logs"])


def test_train_iters_below_the_checkpoint_is_an_error(runs):
    assert runs["below"]["error"].startswith(
        "ResumeError: --train-iters 3 is below the iteration of the checkpoint being resumed")
    assert "is at iteration 4" in runs["below"]["error"]


def test_a_changed_lr_names_both_values_and_the_two_fixes(runs):
    error = runs["lr_changed"]["error"]
    assert error.startswith("ResumeError: --lr 0.0005 differs from the LR schedule of the "
                            "checkpoint being resumed"), error
    assert ": 0.001)" in error and "--override-opt-param-scheduler" in error
    assert "drop --lr to keep the checkpoint's" in error


def test_override_takes_the_new_schedule_from_the_checkpoints_step(runs):
    r = runs["override"]
    assert r["error"] is None and [h["iteration"] for h in r["history"]] == [5, 6]
    # lr 5e-4 -> 1e-4 cosine over 6 iterations of 4 samples, 1 of warm-up; step 20 = iteration 5
    for h in r["history"]:
        assert h["lr"] == pytest.approx(_lr(h["iteration"] * 4, 5e-4, 1e-4, 4, 24), rel=1e-9)
    assert any("--override-opt-param-scheduler: the LR schedule of the flags" in m
               for m in r["logs"])


def test_extending_train_iters_keeps_the_schedule_and_says_what_lr_follows(runs):
    r = runs["extended"]
    assert r["error"] is None and [h["iteration"] for h in r["history"]] == [5, 6]
    assert all(h["lr"] == pytest.approx(1e-4, rel=1e-9) for h in r["history"])  # the min
    assert any("resuming with the checkpoint's LR schedule: lr 0.001 (cosine decay to 0.0001 "
               "over 4 iterations, 1 of warm-up)" in m for m in r["logs"]), r["logs"]
    assert any("--train-iters 6 runs past the end of that schedule (iteration 4): iterations "
               "5-6 run at lr 0.0001" in m for m in r["logs"]), r["logs"]


def test_other_data_needs_reset_data_position(runs):
    error = runs["seq_changed"]["error"]
    assert error.startswith("ResumeError: --seq-length 256 differs from the checkpoint being "
                            "resumed"), error
    assert "its data position (16 rows) would point into other data" in error
    assert "--reset-data-position" in error
    reset = runs["seq_reset"]
    assert reset["error"] is None and reset["start_iteration"] == 4 and reset["start_row"] == 0
    assert [h["iteration"] for h in reset["history"]] == [5]
    assert any("--reset-data-position: the data starts over" in m for m in reset["logs"])


def test_a_changed_global_batch_size_continues_from_the_consumed_rows(runs):
    r = runs["gbs_changed"]
    assert r["error"] is None and r["start_iteration"] == 2
    assert r["start_row"] == 2 * 4 and r["end_row"] == 2 * 4 + 8
    assert any("--global-batch-size 8 (the checkpoint used 4): continuing from row 8" in m
               for m in r["logs"])


def test_reshard_keeps_iteration_schedule_and_data_position(runs):
    r = runs["from_reshard"]
    assert r["error"] is None and r["start_iteration"] == 4 and r["start_row"] == 16
    assert [h["iteration"] for h in r["history"]] == [5, 6]
    assert [h["lr"] for h in r["history"]] == [h["lr"] for h in runs["extended"]["history"]]
    assert any("a resharded checkpoint: weights, LR schedule and data position carried, the "
               "optimizer state starts fresh" in m for m in r["logs"])


def test_saving_onto_the_converted_base_is_refused_and_it_is_never_pruned(runs):
    error = runs["save_onto_base"]["error"]
    assert "holds iter_0000001, written by convert (not by a training run), and this run would "\
           "save iteration 1 over it" in error and "pass another --save directory" in error
    assert runs["prune_keeps_base"]["error"] is None
    # --keep-last 1 removed iteration 2 (the run's), kept 3 and the converted base
    assert [n for n in runs["conv_copy_files"] if n.startswith("iter_")] == \
        ["iter_0000001", "iter_0000003"]
    assert runs["conv_digest_after"] == runs["conv_digest_before"]


def test_a_run_resumed_in_its_converted_load_is_not_refused_for_iterations_before_it(runs):
    """Was: resuming at iteration 3 with --save-interval 1 refused: 'this run would save
    iteration 1 over it' (a run that starts at 3 cannot save 1)."""
    r = runs["resume_in_base"]
    assert r["error"] is None and r["start_iteration"] == 3
    assert [h["iteration"] for h in r["history"]] == [4]


def test_new_adam_settings_on_resume_are_refused_or_taken_into_the_checkpoint(runs):
    """Was: ignored with exit 0; the next checkpoint still held betas (0.9, 0.95), eps 1e-8."""
    error = runs["adam_changed"]["error"]
    assert error.startswith("ResumeError: --adam-beta1 0.1 differs from the optimizer state of "
                            "the checkpoint being resumed"), error
    r = runs["adam_override"]
    assert r["error"] is None and [h["iteration"] for h in r["history"]] == [5]
    assert runs["adam_saved"] == {"adam_beta1": 0.1, "adam_beta2": 0.5, "adam_eps": 1e-3}


def test_a_stop_right_after_an_interval_save_saves_once(runs):
    """Was: 'saved checkpoint ...' twice (the iteration written twice) when a signal or
    --exit-interval came right after an interval save."""
    r = runs["stop_after_interval_save"]
    assert r["error"] is None and [h["iteration"] for h in r["history"]] == [1, 2]
    assert len([m for m in r["logs"] if m.startswith("saved checkpoint")]) == 1, r["logs"]


def test_a_full_disk_is_one_clear_error_and_leaves_nothing(runs):
    error = runs["disk_full"]["error"]
    assert error.startswith("DiskFullError: no space left on ") and "run_c while writing "\
           "checkpoint iter_0000001: need about " in error, error
    assert "nothing was published" in error
    assert runs["disk_full_left"] == ["run_metadata.json"]  # no iter_*.partial


def test_the_restart_clears_a_dead_saves_partial_from_a_full_disk(runs):
    r = runs["restart_on_full_disk"]
    assert r["error"] is None and [h["iteration"] for h in r["history"]] == [3]
    assert "iter_0000003" in r["logs"][-2] or any("saved checkpoint" in m for m in r["logs"])
    assert [n for n in runs["restart_left"] if n.startswith("iter_")] == \
        ["iter_0000002", "iter_0000003"]


@pytest.mark.xdist_group("multiprocess")
def test_a_truncated_rank_file_is_one_line_naming_it_on_every_rank(sft_assets, tmp_path):
    from megatron.sft.runtime.layout import ParallelLayout

    ckpt = tmp_path / "tp2"
    convert_hf_to_megatron(sft_assets["hf"], ckpt, ConvertOptions(layout=ParallelLayout(2, 1),
                                                                  progress=False))
    victim = ckpt / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    # launched as the recipes do (tools/launch.py: torchrun that keeps the worker's last word)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "launch.py"), "--standalone", "--nproc-per-node",
         "2", str(REPO / "tools" / "train_sft.py"), "--load", str(ckpt), "--data-path",
         sft_assets["data"], "--tensor-model-parallel-size", "2", "--seq-length", "128",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1",
         "--no-progress"], capture_output=True, text=True, timeout=600, cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 2, proc.stderr[-3000:]  # the worker's code, not torchrun's 1
    # the two ranks' lines may interleave on the shared stderr: find both messages in it
    errors = re.findall(r"error: (rank 1: )?(\S+) is truncated or was replaced", proc.stderr)
    assert sorted(errors[:2]) == [("", str(victim)), ("rank 1: ", str(victim))], \
        proc.stderr[-3000:]
    assert "PytorchStreamReader" not in proc.stderr and "Connection closed" not in proc.stderr
    # Was: torchrun's ChildFailedError traceback came last and buried the one-line error.
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: (rank 1: )?{re.escape(str(victim))} is truncated or was "
                        r"replaced.*", last), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
