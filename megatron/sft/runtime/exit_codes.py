"""Exit codes a scheduler acts on (``scripts/sft/slurm/submit.sbatch`` requeues on both): a run
that stopped before its end says whether running the same command again continues it.

- ``EXIT_RESUMABLE`` (75, ``EX_TEMPFAIL``): saved and stopped early on a signal (SIGTERM,
  SIGINT, SIGUSR1: Slurm's warning before the time limit, preemption) or at
  ``--exit-duration-in-mins``; the same command resumes from that checkpoint.
- ``EXIT_HUNG`` (76): no training step finished for ``--hang-timeout-minutes``; the watchdog
  stopped every rank without saving, the latest complete checkpoint is intact.
- 2: a user mistake, printed as one ``error:`` line (``megatron.sft.cli``); 1: a bug.
"""

EXIT_RESUMABLE = 75
EXIT_HUNG = 76
