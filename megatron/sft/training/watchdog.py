"""A hang watchdog (``--hang-timeout-minutes``): when no training step has finished for that
long, say which ranks last reported what, and stop every rank with ``EXIT_HUNG`` (76) so the
scheduler can requeue, instead of sitting in a collective until the job's time runs out.

Each rank reports ``(iteration, phase)`` to the process group's key-value store at every phase
(``forward-backward``, ``optimizer``, ``evaluate``, ``save``, ``export``) and a thread checks
the time since its last finished step. On a hang, global rank 0 prints one report grouped by
what the ranks were doing (a rank that reported nothing since is named too); every rank exits
at once, without saving: a save in progress stays an ``iter_N.partial`` directory, removed by
the next run, and the latest complete checkpoint is what the requeued job resumes.

The process group's own collective timeout is set from the same flag
(:func:`collective_timeout_minutes`), later than the watchdog so its report comes first.

Example report (rank 1 stalled inside step 3, rank 0 waiting for it in the gradient all-reduce;
rank 2 was never heard from)::

    hang: no training step finished for 0.2 min (--hang-timeout-minutes 0.2); last reports:
    ranks 0-1: iteration 3, forward-backward, 12 s ago; rank 2: no report. Stopping every rank
    (exit 76); the latest checkpoint is intact, nothing is saved now
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Optional

from megatron.sft.runtime.exit_codes import EXIT_HUNG

_KEY = "sft_watchdog/rank{}"
#: a test-only hook: ``RANK:ITERATION:SECONDS`` makes that rank sleep at the start of that
#: iteration's step, while its peers wait for it in the step's collectives
TEST_HANG_ENV = "MEGATRON_SFT_TEST_HANG"


def collective_timeout_minutes(hang_timeout: Optional[float]) -> float:
    """The process group timeout for ``--hang-timeout-minutes`` (30 without it, torch's gloo
    default): twice the watchdog's, at least one minute, so the watchdog reports first."""
    if hang_timeout is None:
        return 30.0
    return max(2 * hang_timeout, 1.0)


class HangWatchdog:
    """``watchdog.phase("forward-backward", iteration)`` as work starts, ``step_done(iteration)``
    after each step; ``start()`` once the loop begins, ``stop()`` when it ends."""

    def __init__(self, minutes: Optional[float], log_stderr=None):
        self.minutes = minutes
        self.enabled = minutes is not None and minutes > 0
        self.rank, self.world, self.store = 0, 1, None
        self.iteration, self.phase_name = 0, "start"
        self._last_step = time.monotonic()
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._say = log_stderr or (lambda m: print(m, file=sys.stderr, flush=True))

    # --------------------------------------------------------------- what the loop reports
    def start(self, iteration: int) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            from torch.distributed import distributed_c10d

            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.store = distributed_c10d._get_default_store()
        self._last_step = time.monotonic()
        self.phase("start", iteration)
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def phase(self, name: str, iteration: int) -> None:
        if not self.enabled:
            return
        self.phase_name, self.iteration = name, iteration
        if self.store is not None:
            try:
                self.store.set(_KEY.format(self.rank), json.dumps(
                    {"iteration": iteration, "phase": name, "time": time.time()}))
            except Exception:  # the report is best effort; the watchdog still works
                pass
        _test_hang(self.rank, iteration, name)

    def step_done(self, iteration: int) -> None:
        self._last_step = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    # --------------------------------------------------------------- the watching thread
    def _watch(self) -> None:
        limit = self.minutes * 60
        while not self._done.wait(min(max(limit / 10, 0.2), 10.0)):
            if time.monotonic() - self._last_step < limit:
                continue
            if self.rank == 0:
                self._say(self.report())
            else:
                time.sleep(min(2.0, limit))  # rank 0 reads this rank's report first
            os._exit(EXIT_HUNG)

    def report(self) -> str:
        """The one-line report (global rank 0 prints it)."""
        now = time.time()
        seen: dict[tuple, list[int]] = {}
        silent = []
        for rank in range(self.world):
            info = self._read(rank)
            if info is None:
                silent.append(rank)
                continue
            key = (info["iteration"], info["phase"], round(now - info["time"]))
            seen.setdefault(key, []).append(rank)
        parts = [f"{_ranks(ranks)}: iteration {it}, {phase}, {ago} s ago"
                 for (it, phase, ago), ranks in sorted(seen.items(), key=lambda kv: kv[1][0])]
        if silent:
            parts.append(f"{_ranks(silent)}: no report")
        return (f"hang: no training step finished for {self.minutes:g} min "
                f"(--hang-timeout-minutes {self.minutes:g}); last reports: {'; '.join(parts)}. "
                f"Stopping every rank (exit {EXIT_HUNG}); the latest checkpoint is intact, "
                "nothing is saved now")

    def _read(self, rank: int) -> Optional[dict]:
        if self.store is None:
            return {"iteration": self.iteration, "phase": self.phase_name,
                    "time": time.time()} if rank == self.rank else None
        key = _KEY.format(rank)
        try:
            if not self.store.check([key]):
                return None
            return json.loads(self.store.get(key))
        except Exception:
            return None


def _ranks(ranks: list[int]) -> str:
    """``[0] -> 'rank 0'``, ``[0, 1, 2, 5] -> 'ranks 0-2, 5'``."""
    spans, start = [], ranks[0]
    for prev, cur in zip(ranks, ranks[1:] + [None]):
        if cur is None or cur != prev + 1:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(spans)


def _test_hang(rank: int, iteration: int, phase: str) -> None:
    spec = os.environ.get(TEST_HANG_ENV)
    if not spec or phase != "forward-backward":
        return
    want_rank, want_iteration, seconds = spec.split(":")
    if int(want_rank) == rank and int(want_iteration) == iteration:
        time.sleep(float(seconds))
