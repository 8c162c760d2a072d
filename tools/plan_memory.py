#!/usr/bin/env python3
"""Print a training layout and its per-GPU memory estimate for an HF model, before launch.

    python tools/plan_memory.py --hf-model DIR --gpus 256 --tp 8 --pp 1 --ep 32 --seq-length 4096

Counts the model's own tensors from its config (``megatron/sft/training/memory_plan.py`` says
what is counted); exits 2 with the reason when the layout cannot split the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-model", required=True, help="HF model directory (its config.json)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (must divide the layers)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--seq-length", type=int, default=4096, help="tokens per packed row")
    p.add_argument("--micro-batch-size", type=int, default=1, help="rows per micro-batch")
    args = p.parse_args(argv)
    from megatron.sft.bridge.model_shape import UnsupportedModelError
    from megatron.sft.training.memory_plan import plan_memory

    try:
        with open(os.path.join(args.hf_model, "config.json")) as f:
            config = json.load(f)
        plan = plan_memory(config, world=args.gpus, tp=args.tp, pp=args.pp, ep=args.ep,
                           seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                           sequence_parallel=args.tp > 1)
    except (OSError, ValueError, UnsupportedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dp = args.gpus // (args.tp * args.pp)
    print(f"layout: {args.gpus} GPUs = TP{args.tp} x PP{args.pp} x DP{dp}, experts EP{args.ep} "
          f"(x TP{args.tp}); {args.seq_length} tokens x {args.micro_batch_size} per micro-batch")
    print(f"memory: {plan.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
