#!/usr/bin/env python3
"""Re-split a Megatron checkpoint for another TP x PP (x VPP) layout (e.g. to continue on a
different number of GPUs). Model weights and the iteration number are carried; optimizer state
is layout-specific and is not (continue with --finetune or a fresh optimizer).

A LoRA run (adapters only) stays a LoRA run: its adapters are re-split and its lora.json points
to a base at the target layout, by default the run's base resharded into SAVE_DIR/base (or
--lora-base DIR, a checkpoint of the same model already at that layout). Continue with
--load SAVE_DIR --lora-rank R ... (a fresh optimizer). --merge-lora writes the full model with
the adapters merged instead."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.sft.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-dir", required=True, help="source Megatron checkpoint directory")
    p.add_argument("--save-dir", required=True, help="checkpoint directory to create")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1, metavar="TP",
                   help="tensor-parallel size of the output (must divide the attention heads, "
                        "the KV heads or be a multiple of them, and the FFN; default: 1)")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1, metavar="PP",
                   help="pipeline stages of the output (must divide the layers; default: 1)")
    p.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   metavar="N", help="interleaved pipeline: layers per virtual stage of the "
                   "output (needs PP >= 2)")
    p.add_argument("--target-expert-model-parallel-size", type=int, default=1, metavar="EP",
                   help="Mixture-of-Experts models: split each layer's routed experts over EP "
                        "ranks (must divide the experts; one file per TP x PP x EP rank, "
                        "default: 1)")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    p.add_argument("--lora-base", default=None, metavar="DIR",
                   help="LoRA run only: use this checkpoint (latest iteration) as the base "
                        "instead of resharding the run's base into SAVE_DIR/base; it must be at "
                        "the target layout and hold exactly the run's base model")
    p.add_argument("--merge-lora", action="store_true",
                   help="LoRA run only: write a full checkpoint with the adapters merged into "
                        "the base (W + alpha/r B A) instead of adapters")
    p.add_argument("--force", action="store_true", help="replace an existing --save-dir")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the source's files against their recorded SHA-256 "
                        "checksums (faster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.sft.bridge.checkpoint_io import iteration_dir
    from megatron.sft.bridge.reader import CheckpointReader
    from megatron.sft.lora.reshard import reshard_any
    from megatron.sft.lora.run_format import read_lora_info
    from megatron.sft.runtime.layout import ParallelLayout

    layers = None
    if args.target_num_layers_per_virtual_pipeline_stage:
        layers = CheckpointReader(args.load_dir, args.iteration).shape.num_layers
    target = ParallelLayout.from_flags(args.target_tensor_parallel_size,
                                       args.target_pipeline_parallel_size,
                                       args.target_num_layers_per_virtual_pipeline_stage, layers,
                                       ep=args.target_expert_model_parallel_size)
    meta = reshard_any(args.load_dir, args.save_dir, target, args.iteration, args.force,
                              progress=not args.no_progress, lora_base=args.lora_base,
                              merge_lora=args.merge_lora, verify=not args.no_verify)
    print(f"wrote {args.save_dir}: {meta.layout.describe()}")
    info = read_lora_info(iteration_dir(args.save_dir))
    if info is not None:
        s = info.settings
        print(f"LoRA adapters only, no optimizer state (it starts fresh): continue with --load "
              f"{args.save_dir} --lora-rank {s.rank} --lora-alpha {s.alpha} "
              f"--lora-target-modules {','.join(s.targets)}; base {info.base_checkpoint}")
    return 0


if __name__ == "__main__":
    run_cli(main)
