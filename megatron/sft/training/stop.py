"""Why a run stops before its last iteration, decided by every rank together: a signal
(SIGTERM, SIGINT, or SIGUSR1, which Slurm sends before the time limit with ``--signal``), or
``--exit-duration-in-mins`` (Megatron-LM's flag: minutes since the run started). The run then
saves and exits with ``EXIT_RESUMABLE`` (75), so a job script can requeue it.

Why together: a signal reaches the ranks at slightly different moments. A rank that broke out
of the loop at iteration 5 to save while its peers started iteration 6 would leave both waiting
in different collectives. After every step the ranks take the maximum of their "stop" flags
(one tiny all-reduce), so all stop after the same iteration.

Example: ``--exit-duration-in-mins 230`` in a 4-hour job: the first iteration that ends past
230 minutes is the last; it is saved, and the process exits 75.
"""

from __future__ import annotations

import signal
import time
from typing import Optional

import torch

#: the signals that ask a run to save and exit (SIGUSR1: Slurm's ``--signal=USR1@SECONDS``)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequests:
    """``stop = StopRequests(cfg, device, started).install()``, ``stop.reason()`` after each step
    (``None`` to go on, else the sentence to log, the same on every rank), ``stop.restore()``
    at the end; also a context manager."""

    def __init__(self, cfg, device: torch.device, started: float):
        self.device, self.started = device, started
        self.minutes = getattr(cfg, "exit_duration_in_mins", None)
        self.signal: Optional[int] = None
        self._previous: dict = {}

    def install(self) -> "StopRequests":
        """From here on the stop signals only set a flag (read by :meth:`reason`)."""
        def on_signal(signum, frame):
            self.signal = signum

        self._previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> "StopRequests":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def reason(self) -> Optional[str]:
        import torch.distributed as dist

        elapsed = time.monotonic() - self.started
        over = self.minutes is not None and elapsed >= self.minutes * 60
        flags = torch.tensor([self.signal or 0, int(over)], dtype=torch.int64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, over = int(flags[0]), bool(flags[1])
        if signum:
            return f"received signal {signum}: saving and exiting"
        if over:
            return (f"--exit-duration-in-mins {self.minutes:g}: {elapsed / 60:.1f} minutes since "
                    "the start; saving and exiting")
        return None
