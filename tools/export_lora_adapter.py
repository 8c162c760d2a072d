#!/usr/bin/env python3
"""Write a LoRA run's adapters as an HF PEFT adapter directory.

Creates adapter_config.json and adapter_model.safetensors with HF module names (q_proj, k_proj,
v_proj, o_proj, gate_proj, up_proj, down_proj): the fused QKV and gate/up adapters are split
exactly, the TP shards joined. Load with ``peft.PeftModel.from_pretrained(base_model, OUT)``
where base_model is the HF model the run's base checkpoint was converted from. To get one
merged model instead, use merge_and_export.sh on the same checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.sft.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-dir", required=True, help="a LoRA run's --save directory")
    p.add_argument("--save-dir", required=True, help="PEFT adapter directory to create")
    p.add_argument("--hf-reference", default=None,
                   help="the base HF model directory (recorded as base_model_name_or_path); "
                        "default: the HF directory a run loaded directly (--load HF_DIR)")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="cast adapter weights (default: the checkpoint's dtype)")
    p.add_argument("--force", action="store_true", help="replace an existing --save-dir")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the run's files against their recorded SHA-256 checksums")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.sft.bridge.checkpoint_io import dtype_from_name
    from megatron.sft.lora.peft_export import export_lora_adapter

    reference = args.hf_reference
    if reference is None:  # a run that loaded an HF directory knows its base
        from megatron.sft.bridge.checkpoint_io import iteration_dir, read_metadata
        from megatron.sft.training.hf_output import adapter_base

        meta = read_metadata(iteration_dir(Path(args.load_dir), args.iteration))
        reference = adapter_base(args.load_dir, meta)
    out = export_lora_adapter(args.load_dir, args.save_dir, reference, args.iteration,
                              force=args.force,
                              dtype=dtype_from_name(args.dtype) if args.dtype else None,
                              verify=not args.no_verify)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
