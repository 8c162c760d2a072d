#!/usr/bin/env python3
"""The built-in tiny end-to-end job (CPU, offline): what `make demo` runs.

Makes a BPE tokenizer with a chat template, a tiny random Qwen2 model and a synthetic
multi-turn dataset ("Repeat: w1 w2 ..." with held-out prompts), converts the model to Megatron
TP=2, pre-tokenizes, fine-tunes on 2 gloo ranks with megatron-core, exports back to
HuggingFace, checks logits against transformers at both ends, and measures exact-match accuracy
on the held-out prompts before and after SFT. Prints a per-stage summary and writes a
loss-curve PNG. Takes about 4 minutes on 2 CPU cores; training shows a live progress line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None,
                   help="where everything is written (replaced on each run; default runs/demo, "
                        "runs/demo_moe with --moe)")
    p.add_argument("--train-iters", type=int, default=400,
                   help="full-SFT iterations (global batch 16 rows of 128 tokens, ~4 packed conversations each)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="> 0: afterwards adapt the fine-tuned model to a second task ('Next: "
                        "tiger piano' -> 'rocket lemon') with LoRA adapters of this rank on all "
                        "four targets (alpha 2 x rank), export them merged and measure that "
                        "task's accuracy; the summary puts its training time beside full SFT's")
    p.add_argument("--lora-train-iters", type=int, default=200,
                   help="iterations of the LoRA stage (with --lora-rank)")
    p.add_argument("--moe", action="store_true",
                   help="a Mixture-of-Experts model instead: tiny Qwen3-MoE (8 experts, top-2), "
                        "its experts split over the 2 ranks (EP=2); workdir runs/demo_moe")
    p.add_argument("--min-accuracy", type=float, default=0.9,
                   help="exit 1 when held-out accuracy after SFT (or after the LoRA stage) is "
                        "below this")
    args = p.parse_args(argv)
    from megatron.sft.runtime.distributed import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()
    from megatron.sft.quickstart.pipeline import Demo, DemoConfig, StageFailed

    workdir = args.workdir or str(REPO / "runs" / ("demo_moe" if args.moe else "demo"))
    demo = Demo(DemoConfig(workdir=Path(workdir), train_iters=args.train_iters,
                           lora_rank=args.lora_rank, lora_train_iters=args.lora_train_iters,
                           moe=args.moe))
    try:
        results = demo.run()
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(demo.summary())
    for key in ("accuracy_after", "lora_accuracy_after"):
        if key in results and results[key] < args.min_accuracy:
            print(f"error: held-out accuracy {results[key]:.0%} ({key}) is below "
                  f"{args.min_accuracy:.0%}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
