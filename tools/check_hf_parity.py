#!/usr/bin/env python3
"""Compare a Megatron checkpoint's logits with the HuggingFace model it came from.

Reads the layout from the checkpoint and runs on as many ranks as it needs: a plain
``python tools/check_hf_parity.py --load CKPT --hf-model HF_DIR`` starts itself under torchrun
with the fewest ranks the layout runs on (TP2 x PP2 -> 4; expert parallelism is carved out of
the data-parallel ranks, so TP1 x EP2 -> 2 and TP2 x EP2 -> 4). Under torchrun, any multiple
of that works:

    torchrun --nproc-per-node 4 tools/check_hf_parity.py --load CKPT --hf-model HF_DIR

Builds the megatron-core model from the checkpoint's metadata (TE spec on GPU when available,
local spec otherwise), runs random tokens through the real pipeline schedule, and reports the
largest absolute logit difference against ``transformers``. Exits 1 above ``--atol``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    # The choices are the registries' (a backend registered in model/attention/ shows here).
    from megatron.sft.model.attention import attention_backend_choices
    from megatron.sft.model.moe.experts import MOE_EXPERTS_HELP, MOE_EXPERTS_IMPLS
    from megatron.sft.model.layer_impl import TRANSFORMER_IMPLS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Megatron checkpoint directory")
    p.add_argument("--hf-model", required=True, help="HuggingFace model directory to compare with")
    p.add_argument("--iteration", type=int, default=None, help="default: latest")
    p.add_argument("--seq-length", type=int, default=32, help="tokens per random sequence")
    p.add_argument("--batch-size", type=int, default=2, help="random sequences compared")
    p.add_argument("--num-microbatches", type=int, default=None,
                   help="default: PP when virtual pipeline stages are used, else 1")
    p.add_argument("--seed", type=int, default=1234, help="seed of the random tokens")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest allowed |logits - HF logits|; exit 1 above it (default: 1e-4, "
                        "for fp32; bf16 checkpoints need about 5e-2)")
    p.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS,
                   default="auto", help="layer modules (as in tools/train_sft.py)")
    p.add_argument("--attention-backend", choices=attention_backend_choices(),
                   default="auto", help="core attention (as in tools/train_sft.py)")
    p.add_argument("--moe-experts-impl", choices=MOE_EXPERTS_IMPLS, default="auto",
                   help="Mixture-of-Experts models: " + MOE_EXPERTS_HELP)
    p.add_argument("--output-json", default=None, help="write the measured differences here")
    return p.parse_args(argv)


def launch_on_enough_ranks(nproc: int, argv) -> int:
    """Run this tool again under torchrun on ``nproc`` local ranks; returns its exit code."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)]
    print(f"[parity] the checkpoint's layout needs {nproc} ranks: {' '.join(cmd[1:])}",
          flush=True)
    return subprocess.call(cmd)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron.sft.bridge.checkpoint_io import iteration_dir, read_metadata
    from megatron.sft.runtime.distributed import destroy_distributed, initialize_distributed

    meta = read_metadata(iteration_dir(args.load, args.iteration))
    needed = meta.layout.min_world_size()
    if "RANK" not in os.environ and needed > 1:
        return launch_on_enough_ranks(needed, argv)
    info = initialize_distributed(meta.layout, seed=args.seed)
    from megatron.sft.training.forward_logits import pipeline_logits
    from megatron.sft.model.builder import build_model_from_checkpoint

    from megatron.sft.model.layer_impl import resolve_layer_impl

    impl = resolve_layer_impl(args.transformer_impl, args.attention_backend, info.device.type,
                              args.moe_experts_impl, getattr(torch, meta.params_dtype))
    chunks, meta, _ = build_model_from_checkpoint(args.load, args.iteration, impl=impl,
                                                  seq_length=args.seq_length)
    vocab = meta.hf_config["vocab_size"]
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, vocab, (args.batch_size, args.seq_length), generator=gen)
    nmb = args.num_microbatches or (meta.layout.pp if meta.layout.vpp else 1)
    logits = pipeline_logits(chunks, tokens, vocab, num_microbatches=nmb)
    status = 0
    if logits is not None and info.dims.tp_rank == 0:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(
            args.hf_model, dtype=getattr(torch, meta.params_dtype), attn_implementation="eager"
        ).to(info.device)
        with torch.no_grad():
            ref = hf(tokens.to(info.device)).logits.float()
        diff = (logits - ref).abs().max().item()
        ok = diff <= args.atol
        from megatron.sft.bridge.architectures import shape_of

        experts = f", {impl.experts} experts" if shape_of(meta.hf_config)[1].moe else ""
        print(f"[parity] {meta.architecture} {meta.layout.describe()} {meta.params_dtype} "
              f"({impl.describe()}{experts}): max|logits - HF| = {diff:.3e} (atol {args.atol}) "
              f"{'OK' if ok else 'FAIL'}", flush=True)
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump({"max_abs_diff": diff, "ok": ok, "architecture": meta.architecture}, f)
        status = 0 if ok else 1
    import torch.distributed as dist

    flag = torch.tensor([status], dtype=torch.int64, device=info.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    destroy_distributed()
    return int(flag.item())


if __name__ == "__main__":
    sys.exit(main())
