#!/usr/bin/env python3
"""Convert a HuggingFace model directory (safetensors) into a Megatron-LM checkpoint split for
tensor x pipeline (x expert) parallelism.

Output layout (what Megatron-LM and our training/export tools read):

  SAVE_DIR/latest_checkpointed_iteration.txt
  SAVE_DIR/iter_0000001/sft_metadata.json
  SAVE_DIR/iter_0000001/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt

Supported architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM, and the Mixture-of-Experts Qwen3MoeForCausalLM, Qwen2MoeForCausalLM,
MixtralForCausalLM (routed experts one tensor per expert or fused, either is read). Everything is validated (architecture, TP/PP divisibility, every tensor name
and shape) before anything is written; output appears only when complete.
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
    p.add_argument("--load-dir", required=True, help="HuggingFace model directory")
    p.add_argument("--save-dir", required=True, help="Megatron checkpoint directory to create")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1, metavar="TP",
                   help="split each layer over TP ranks: TP must divide the attention heads and "
                        "the FFN, and divide the KV heads or be a multiple of them (default: 1)")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1, metavar="PP",
                   help="split the layers into PP pipeline stages (must divide the number of "
                        "layers; default: 1)")
    p.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   metavar="N", help="interleaved pipeline: layers per virtual stage "
                   "(checkpoint then holds model0, model1, ... per rank)")
    p.add_argument("--target-expert-model-parallel-size", type=int, default=1, metavar="EP",
                   help="Mixture-of-Experts models: split each layer's routed experts over EP "
                        "ranks (must divide the experts; one file per TP x PP x EP rank, "
                        "default: 1)")
    p.add_argument("--target-expert-tensor-parallel-size", type=int, default=None,
                   metavar="ETP", help="Mixture-of-Experts models: 1 keeps each expert whole "
                   "with TP > 1 (Megatron-LM's files for it: one per EP rank, EP a multiple "
                   "of TP); default: TP, each expert split like the dense weights")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP (default: 128)")
    p.add_argument("--params-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="cast weights (default: keep the HF checkpoint's dtype)")
    p.add_argument("--force", action="store_true", help="replace an existing --save-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.sft.bridge.architectures import shape_of
    from megatron.sft.bridge.checkpoint_io import dtype_from_name
    from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron, load_hf_config
    from megatron.sft.runtime.layout import ParallelLayout

    layers = None
    if args.target_num_layers_per_virtual_pipeline_stage:
        layers = shape_of(load_hf_config(args.load_dir))[1].num_layers
    layout = ParallelLayout.from_flags(args.target_tensor_parallel_size,
                                       args.target_pipeline_parallel_size,
                                       args.target_num_layers_per_virtual_pipeline_stage, layers,
                                       ep=args.target_expert_model_parallel_size,
                                       etp=args.target_expert_tensor_parallel_size)
    opts = ConvertOptions(
        layout=layout,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        params_dtype=dtype_from_name(args.params_dtype) if args.params_dtype else None,
        force=args.force,
        progress=not args.no_progress,
    )
    meta = convert_hf_to_megatron(args.load_dir, args.save_dir, opts)
    print(f"wrote {args.save_dir}: {meta.architecture} {layout.describe()}, {meta.params_dtype}, "
          f"vocab {meta.hf_config['vocab_size']} padded to {meta.padded_vocab_size}")
    return 0


if __name__ == "__main__":
    run_cli(main)
