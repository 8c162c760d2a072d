#!/usr/bin/env python3
"""Supervised fine-tuning on megatron-core. Launch with torchrun, e.g.:

  torchrun --nproc-per-node 8 tools/train_sft.py --load CKPT --save OUT \
      --data-path assets/data/X/Tokenized-X-tok-16384 --seq-length 16384 \
      --tensor-model-parallel-size 2 --micro-batch-size 1 --global-batch-size 64 \
      --train-iters 1000 --lr 1e-5 --bf16 --use-distributed-optimizer

The model is rebuilt from --load's metadata (no model-shape flags); --load may also be a
HuggingFace model directory (config.json + safetensors), read directly: each rank reads its
shard, and --save-hf DIR writes the trained model back as one. Run with --help for all
flags; a YAML --config may hold them too (command line wins)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.sft.cli import run_cli  # noqa: E402


def main(argv=None) -> int:
    from megatron.sft.training.arguments import parse_config

    cfg = parse_config(argv)  # a bad --config fails fast, before megatron-core is imported
    from megatron.sft.runtime.distributed import destroy_distributed
    from megatron.sft.training.trainer import Trainer

    from megatron.sft.runtime.exit_codes import EXIT_RESUMABLE

    trainer = Trainer(cfg, log=lambda msg: print(msg, flush=True))
    try:
        trainer.setup()
        trainer.train()
    finally:
        destroy_distributed()
    # stopped early by a signal or --exit-duration-in-mins, saved: the same command resumes
    return EXIT_RESUMABLE if trainer.stopped_early else 0


if __name__ == "__main__":
    run_cli(main)
