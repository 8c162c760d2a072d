"""``torchrun``, with the run's own last word and exit code, and signals that wait for a save.

What plain ``torchrun`` does that a cluster job cannot live with:

- every worker exit code becomes 1, so a job script cannot tell "saved, run me again" (75) or
  "hung" (76) from a crash; and a worker's one-line ``error:`` is followed by torchrun's own
  ``ChildFailedError`` traceback, which buries it;
- on SIGTERM it gives the workers 30 s before SIGKILL (a large checkpoint takes longer to
  save), and SIGUSR1 (Slurm's warning before the time limit) kills torchrun outright while the
  workers never hear of it.

``python tools/launch.py TORCHRUN_ARGS...`` takes torchrun's own arguments, runs it in this
process with SIGTERM, SIGINT and SIGUSR1 forwarded to the workers (each saves and exits 75,
however long that takes; a second Ctrl-C kills them; torchrun keeps SIGHUP/SIGQUIT), then
exits with the first failed worker's code, printing its ``error:`` line last.

Example (a bad flag on 2 ranks)::

    $ python tools/launch.py --standalone --nproc-per-node 2 tools/train_sft.py --lr -1 ...
    ...torchrun's one-line failure log...
    error: --lr -1.0 is negative; the optimizer would climb the loss; give a positive --lr ...
    $ echo $?
    2
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

from megatron.sft.runtime.exit_codes import EXIT_HUNG, EXIT_RESUMABLE

#: forwarded to the workers by this launcher (torchrun keeps the others it handles)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def child_pids(parent: Optional[int] = None) -> list[int]:
    """The processes whose parent is ``parent`` (this one): torchrun's workers."""
    parent = os.getpid() if parent is None else parent
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


_interrupts = [0]


def _forward(signum, frame) -> None:
    """Pass the signal on; a second Ctrl-C kills the workers without waiting for their save."""
    if signum == signal.SIGINT:
        _interrupts[0] += 1
        if _interrupts[0] == 2:
            print("second Ctrl-C: killing the workers without saving (the latest complete "
                  "checkpoint stays intact)", file=sys.stderr, flush=True)
    kill = signal.SIGKILL if _interrupts[0] >= 2 else signum
    for pid in child_pids():
        try:
            os.kill(pid, kill)
        except ProcessLookupError:
            pass


def failure_line(code: int, message) -> str:
    """What the launcher prints last for a worker that exited ``code`` with ``message``."""
    if isinstance(message, dict):  # torchrun's error-file format
        message = message.get("message")
    if code == EXIT_RESUMABLE:
        return (f"stopped before the end, after saving (exit {EXIT_RESUMABLE}): run the same "
                "command again to resume")
    if code == EXIT_HUNG:
        return (f"stopped by the hang watchdog (exit {EXIT_HUNG}): see the report above; the "
                "latest checkpoint is intact, the same command resumes from it")
    if isinstance(message, str) and message.startswith("error: "):
        return message
    return f"a worker failed with exit code {code}; its output above says why"


def main(argv: Optional[list[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    import tempfile

    argv = sys.argv[1:] if argv is None else argv
    # torchrun copies the first failed worker's error file to its own (else it logs that it
    # has none); the workers get their own files whatever this is
    os.environ.setdefault("TORCHELASTIC_ERROR_FILE",
                          os.path.join(tempfile.mkdtemp(prefix="sft-launch-"), "error.json"))
    for s in FORWARDED:
        signal.signal(s, _forward)
    try:
        torchrun_main(["--signals-to-handle", "SIGHUP,SIGQUIT", *argv])
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        print(failure_line(code, failure.message), file=sys.stderr, flush=True)
        return code
    return 0
