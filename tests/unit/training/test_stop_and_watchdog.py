"""Stopping early, the same way on every rank: a signal or --exit-duration-in-mins (exit 75),
the hang watchdog's report (exit 76), and what tools/launch.py prints last; pure parts, no
process group (the whole path runs in test_train_cli's Slurm job)."""

import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch

from megatron.sft.runtime.exit_codes import EXIT_HUNG, EXIT_RESUMABLE
from megatron.sft.runtime.launch import failure_line
from megatron.sft.training.stop import StopRequests
from megatron.sft.training.watchdog import HangWatchdog, _ranks, collective_timeout_minutes


def test_a_signal_or_the_duration_asks_to_save_and_exit():
    cpu = torch.device("cpu")
    with StopRequests(SimpleNamespace(exit_duration_in_mins=None), cpu, time.monotonic()) as stop:
        assert stop.reason() is None
        os.kill(os.getpid(), signal.SIGTERM)  # handled: no exit
        assert stop.reason() == "received signal 15: saving and exiting"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the loop
    with StopRequests(SimpleNamespace(exit_duration_in_mins=1.5), cpu,
                      time.monotonic() - 91) as stop:
        assert stop.reason() == ("--exit-duration-in-mins 1.5: 1.5 minutes since the start; "
                                 "saving and exiting")
    with StopRequests(SimpleNamespace(exit_duration_in_mins=1.5), cpu,
                      time.monotonic() - 80) as stop:
        assert stop.reason() is None


def test_the_watchdog_report_groups_ranks_and_names_silent_ones():
    assert _ranks([3]) == "rank 3" and _ranks([0, 1, 2, 5, 7, 8]) == "ranks 0-2, 5, 7-8"
    dog = HangWatchdog(0.5)
    now = time.time()

    class Store:  # rank 0 and 2 report, rank 1 never did
        data = {"sft_watchdog/rank0": f'{{"iteration": 7, "phase": "optimizer", "time": {now - 40}}}',
                "sft_watchdog/rank2": f'{{"iteration": 6, "phase": "save", "time": {now - 95}}}'}

        def check(self, keys):
            return all(k in self.data for k in keys)

        def get(self, key):
            return self.data[key].encode()

    dog.store, dog.world = Store(), 3
    assert dog.report() == (
        "hang: no training step finished for 0.5 min (--hang-timeout-minutes 0.5); last reports: "
        "rank 0: iteration 7, optimizer, 40 s ago; rank 2: iteration 6, save, 95 s ago; rank 1: "
        f"no report. Stopping every rank (exit {EXIT_HUNG}); the latest checkpoint is intact, "
        "nothing is saved now")
    assert collective_timeout_minutes(None) == 30 and collective_timeout_minutes(0.1) == 1.0
    assert collective_timeout_minutes(20) == 40


def test_the_launcher_ends_on_the_workers_word():
    line = "error: --lr -1.0 is negative"
    assert failure_line(2, {"message": line, "extraInfo": {}}) == line
    assert failure_line(1, "To enable traceback see: https://...").startswith(
        "a worker failed with exit code 1")
    assert f"(exit {EXIT_RESUMABLE}): run the same command again" in failure_line(75, "")
    assert f"(exit {EXIT_HUNG})" in failure_line(76, "")


@pytest.mark.parametrize("flag", ["exit_duration_in_mins", "hang_timeout_minutes"])
def test_minutes_must_be_positive(flag):
    from megatron.sft.training.arguments import TrainConfig

    cfg = TrainConfig(load="x", data_path="d", train_iters=2, **{flag: 0})
    with pytest.raises(ValueError, match=rf"--{flag.replace('_', '-')} 0: give a positive number"):
        cfg.validate(1)
