"""A local stand-in for ``srun`` (what submit.sbatch calls as ``$SRUN``): runs the command once
per "node" (``SLURM_NNODES`` processes on this machine, each with its ``SLURM_NODEID`` /
``SLURM_PROCID``), forwards SIGUSR1 and SIGTERM to them as srun forwards signals to its tasks,
and exits with the highest task exit code, as srun does."""

import os
import signal
import subprocess
import sys


def main() -> int:
    args = sys.argv[1:]
    while args and args[0].startswith("--"):  # srun's own options: one task per node here
        args.pop(0)
    tasks = [subprocess.Popen(args, env={**os.environ, "SLURM_NODEID": str(node),
                                          "SLURM_PROCID": str(node), "SLURM_LOCALID": "0"})
             for node in range(int(os.environ["SLURM_NNODES"]))]

    def forward(signum, frame):
        for task in tasks:
            if task.poll() is None:
                task.send_signal(signum)

    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, forward)
    codes = [task.wait() for task in tasks]
    return max(c if c >= 0 else 128 - c for c in codes)


if __name__ == "__main__":
    sys.exit(main())
