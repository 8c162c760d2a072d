#!/usr/bin/env python3
"""Merge a Megatron checkpoint (any TP x PP x VPP) back into a HuggingFace model directory.

Writes safetensors shards (with model.safetensors.index.json when more than one), config.json
(dtype set), and copies the tokenizer files, generation config and chat template from the
reference HF directory. The checkpoint's own metadata supplies the architecture and config; the
reference is checked to be the same model. Output appears only when complete. A LoRA run's
adapters are merged into the base checkpoint named by its lora.json (W + alpha/r B A per shard).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.sft.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-dir", required=True, help="Megatron checkpoint directory")
    p.add_argument("--save-dir", required=True, help="HuggingFace directory to create")
    p.add_argument("--hf-reference", default=None,
                   help="HF directory the checkpoint came from (tokenizer files are copied); "
                        "default: the checkpoint's hf_reference/ or the HF directory a run "
                        "loaded directly (--load HF_DIR), when it has one")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="cast weights (default: the checkpoint's dtype)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file to write; bigger models are split into "
                        "model-0000K-of-0000N.safetensors with an index, e.g. 5GB, 500MB "
                        "(default: 5GB)")
    p.add_argument("--force", action="store_true", help="replace an existing --save-dir")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the checkpoint's files against the SHA-256 checksums "
                        "recorded when they were written (faster; a damaged file is then only "
                        "caught if it cannot be parsed or holds NaN/inf)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.sft.bridge.checkpoint_io import dtype_from_name
    from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
    from megatron.sft.lora.merge import open_checkpoint

    # A LoRA run is read merged into its base.
    reader = open_checkpoint(args.load_dir, args.iteration, verify=not args.no_verify)
    reference = args.hf_reference
    if reference is None:  # a run that loaded an HF directory knows its tokenizer
        from megatron.sft.training.hf_output import reference_dir

        reference = reference_dir(args.load_dir, reader.meta)
        if reference is not None:
            print(f"tokenizer and generation files from {reference} (the run's HF source)")
    out = export_megatron_to_hf(reader, args.save_dir, reference, ExportOptions(
        iteration=args.iteration,
        dtype=dtype_from_name(args.dtype) if args.dtype else None,
        max_shard_size=args.max_shard_size,
        force=args.force,
        progress=not args.no_progress,
    ))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
