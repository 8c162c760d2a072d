#!/usr/bin/env python3
"""The GPU proof (issue 21) in one command: setup, the GPU tests, throughput against the goals,
the 1.5B / 16k recipe end to end and the MoE layer micro-benchmark, in at most 8 minutes on one
H100/H200. Results are written under ``--out`` as they come (a timeout keeps the earlier
numbers); one summary table is printed last.

  bash benchmarks/gpu_proof.sh                  # the GPU machine (wheels from gpu_proof_wheels.sh)
  python benchmarks/gpu_proof.py --device cuda --wheels .whl --out OUT
  python benchmarks/gpu_proof.py --device cpu --tiny --out DIR      # dry run of every step on CPU

Steps and their budgets (seconds; a step's unused seconds pass on to the later ones, the whole
run stays within ``--budget``, 480 by default, which scales every budget). A step that reaches
its budget is stopped (its whole process tree) and reported "timeout"; the next one starts.
Estimates are for one H200 and are estimates: this script has not run on a GPU yet.

=========== ====== ============================================================= ===========
step        budget what                                                          estimate
=========== ====== ============================================================= ===========
setup           30 install ``--wheels``; versions; attention backends and           ~10 s
                   experts implementations that can run here
gpu tests      100 ``pytest -x -q tests/gpu`` (4 xdist workers: the parity tests    ~60 s
                   launch torchrun per case, ~15 s each)
throughput     160 5 configurations x (3 warm-up + 5 measured iterations), then     ~160 s
                   a profile of 2 iterations of the best 4k configuration
recipe         140 R1 recipe: train 4 iterations (saves 2, 4), re-run to 6         ~130 s
                   (resumes from 4), merge_and_export.sh, a transformers forward
moe             25 ``bench_moe_gpu.py --parts layer`` if the MoE work has landed    ~20 s
kernels         25 ``bench_attention_kernels.py``: varlen/flex fwd+bwd at 4k/16k    ~20 s
                   for the dense shape, GPT-OSS sinks (and window) and MLA 192/128
=========== ====== ============================================================= ===========

One background process does the setup probe, then prepares every input on the CPU while the
GPU tests run (~70 s, none of it on the GPU): a random Qwen2-1.5B-shaped model converted to
Megatron plus long-tailed packed data for the throughput runs, and for the recipe a random
R1-Distill-Qwen-1.5B-shaped model (``bench_train_gpu.R1_DISTILL_QWEN_1_5B``) with a BPE
tokenizer trained in-process (``tiny_tokenizer``'s R1-like chat template; the vocabulary is the
model's), ``convert_deepseek_r1_to_megatron.sh 1.5B 1 1``, 300 synthetic reasoning
conversations with ``<think>`` blocks (long-tailed, none over 90 % of 16k tokens) and
``tokenize_dataset.sh ... 16384``. It then waits, torch and transformers imported, to export
and read back the recipe's result at the end.

Throughput (Qwen2-1.5B shape, bf16, one GPU, distributed optimizer, packed rows of
``bench_train_gpu``'s long-tailed documents: log-normal, median ~2k tokens at 16k, scaled to the
row at 4k): all configurations run in ONE process (one import of megatron-core, one process
group; a Trainer per configuration, as tests/integration/training/resume_worker.py does)
instead of one torchrun launch each (~15 s of imports and start-up saved per configuration).

- ``varlen`` 4096/none, ``varlen`` 16384/selective, ``sdpa`` 4096/none, ``flex`` 4096/none,
  the profile, ``flex`` 16384/selective, in that order; global batch 8 rows at 4k and 2 at 16k
  (32,768 tokens a step either way, ~9.8 GFLOP a token: ~0.8 s a step at 40 % MFU, ~1.3 s at
  25 %). The worker starts after setup and imports megatron-core while the GPU tests run.
- A configuration costs ~6-8 s to build (load 3.6 GB, DDP, optimizer) + 8 steps ~10 s;
  ``flex`` adds its first-use compile (``torch.compile`` of ``flex_attention`` forward and
  backward plus ``create_block_mask``: ~30-60 s, once per sequence length, ``dynamic=False``).
  Before each configuration the worker checks that the time left covers its estimate (plus
  ~45 s kept for the profile until it has run); if not it is reported "skipped: time budget"
  (flex at 16k, last, is the likely one).
- Numbers: medians of the measured iterations from the Trainer's own records (tokens/s of the
  rows, TFLOP/s and MFU over the real documents, ``megatron.sft.training.metrics``, peak 989
  TFLOP/s on H100/H200), peak memory (``max_memory_allocated``, reset per configuration). An
  out-of-memory configuration is reported as OOM; a crashed worker (say a CUDA error) is
  reported for its configuration and restarted for the rest.
- The profile (``torch.profiler``, 1 warm-up + 2 iterations of the fastest 4k configuration)
  is summarised by category; see :data:`PROFILE_RULES` for how CUDA kernels are classified
  (``top`` in results.json lists the 40 biggest kernels with their category, to check the
  rules). "kernels N % of wall" is kernel time over the 2 iterations' wall time, profiler
  overhead included. ``--trace`` keeps the Chrome trace (gzipped, if under 15 MB and time is
  left once the 16k flex run is done).

The recipe (R1-Distill-Qwen-1.5B shape with the tokenizer's vocabulary, ~1.33 B parameters):
``GPUS_PER_NODE=1 TRAIN_ITERS=4 SAVE_INTERVAL=2 GBS=4 KEEP_LAST=1 bash
scripts/sft/SFT_Hybrid_R1_1.5B_OpenThoughts_1M.sh train``, then ``TRAIN_ITERS=6``. A step is 4
rows of 16,384 tokens with the recipe's full recompute (~2.5 s); a checkpoint with the
distributed optimizer's fp32 state is ~14 bytes a parameter, ~18.6 GB (~20 s to write and hash
on tmpfs), so the run writes three and reads one: most of the recipe's time is checkpoint I/O.
``KEEP_LAST=1`` keeps two on disk at most (~37 GB); the big files live in ``--workdir``
(default on CUDA: ``/dev/shm`` or ``/tmp``, whichever has more room), never under ``--out``.

``--tiny`` (CPU dry run, ~35 s on 2 idle cores): a 2-layer hidden-64 model for both, 40
conversations, sequence 256, 2 warm-up + 2 measured iterations; varlen/flex, the GPU tests and
the MoE benchmark (whose flags are checked) report "skipped: no CUDA". The convert, tokenize and
export scripts run with ``PYTHON=echo`` and their tools in-process with the arguments the
scripts built (``processes.run_script``); the two training runs are real launches.

Files under ``--out`` (the run tool returns at most 8): results.json, prep.log,
gpu_tests.log, throughput.log, recipe.log, moe.log, trace.json.gz, and the console log the
command tees there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# The parts live in benchmarks/gpu_proof_parts/: settings and cli, processes (children, deadlines,
# results files), orchestrator (the steps within their budgets), step_* (one module a step),
# the child steps' workers (probes, recipe_data, throughput, profile, hf_forward) and summary.
from gpu_proof_parts.cli import parse_args  # noqa: E402
from gpu_proof_parts.hf_forward import child_forward  # noqa: E402
from gpu_proof_parts.orchestrator import Proof  # noqa: E402
from gpu_proof_parts.processes import _default_workdir  # noqa: E402
from gpu_proof_parts.recipe_data import child_prep  # noqa: E402
from gpu_proof_parts.throughput import child_throughput  # noqa: E402


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.workdir is None:
        args.workdir = str(_default_workdir(args))
    args.workdir = str(Path(args.workdir).resolve())
    args.out = str(Path(args.out).resolve())
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.run_step:
        from megatron.sft.runtime.distributed import quiet_megatron_import_warnings

        quiet_megatron_import_warnings()
        return {"prep": child_prep, "throughput": child_throughput,
                "forward": child_forward}[args.run_step](args)
    return Proof(args).main()


if __name__ == "__main__":
    sys.exit(main())
