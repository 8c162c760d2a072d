#!/usr/bin/env python3
"""``--eval-generate`` at every 2-rank layout against ``transformers``, in one launch (outside
the test suite, which proves TP2, PP2 and EP2 and keeps its time budget):

TP2, PP2, PP2 x VPP2, CP2, TP2 + sequence parallelism, DP2, DP2 with Megatron-FSDP (ZeRO-3),
and LoRA at TP2. Each run loads the same HF model with large random weights (so the greedy
tokens vary and no step is a near-tie), trains 2 iterations, generates 32 tokens for 2
validation prompts at iteration 2 and exports that iteration (merged, for LoRA); the tokens must
equal ``generate(do_sample=False)`` on the export, token for token.

  python benchmarks/eval_generate_layouts.py [--only tp2,cp2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2),
    "pp2": dict(pipeline_model_parallel_size=2),
    "pp2vpp2": dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1),
    "cp2": dict(context_parallel_size=2),
    "tp2sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "dp2": dict(),
    "fsdp": dict(use_megatron_fsdp=True),
    "lora-tp2": dict(tensor_model_parallel_size=2, lora_rank=4),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(LAYOUTS), help="comma-separated layouts")
    p.add_argument("--keep", default=None, help="work here and keep it (default: a temp dir)")
    args = p.parse_args()
    names = args.only.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        p.error(f"--only {','.join(unknown)}: choose among {', '.join(LAYOUTS)}")

    from transformers import AutoTokenizer

    from megatron.sft.bridge.random_hf_model import make_random_hf_model
    from megatron.sft.data.preprocess import PreprocessConfig, preprocess
    from megatron.sft.data.tiny_tokenizer import save_tiny_tokenizer
    from sft_testing import check_generations_against_hf, run_batch, write_arithmetic_conversations

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="eval_generate_"))
    root.mkdir(parents=True, exist_ok=True)
    tok = save_tiny_tokenizer(root / "tokenizer", template="chatml")
    write_arithmetic_conversations(root / "chat.jsonl", 400, seed=0)
    preprocess(PreprocessConfig(input=str(root / "chat.jsonl"), tokenizer_model=str(tok),
                                output_prefix=str(root / "ds"), progress=False))
    hf = make_random_hf_model("Qwen2ForCausalLM", root / "hf", seed=3, overrides=dict(
        vocab_size=len(AutoTokenizer.from_pretrained(tok)), initializer_range=0.3))
    assets = {"tokenizer": tok, "data": str(root / "ds"), "hf": hf}
    scenarios = {}
    for name in names:
        scenarios[name] = {"kind": "train", "mode": "train", "config": dict(
            load=str(hf), data_path=assets["data"], seq_length=128, micro_batch_size=2,
            global_batch_size=8, train_iters=2, lr=1e-4, lr_decay_style="constant",
            no_progress=True, split="90,10,0", clip_grad=0.0, eval_interval=2, eval_iters=1,
            eval_generate=2, eval_generate_tokens=32, save=str(root / "runs" / name),
            save_hf=str(root / "runs" / f"{name}-hf"), **LAYOUTS[name])}
    t0 = time.perf_counter()
    batch = run_batch(root / "runs", 2, scenarios)
    print(f"one 2-rank launch, {len(names)} runs: {time.perf_counter() - t0:.0f}s")
    failed = 0
    for name in names:
        try:
            history = batch[name]
            check_generations_against_hf(history[-1]["generations"],
                                         root / "runs" / f"{name}-hf", assets, 32)
            print(f"{name:9s} 32 tokens x 2 prompts == transformers' greedy generate "
                  f"({history[-1]['generate_s']:.2f}s)")
        except BaseException as exc:  # pytest.fail raises a BaseException
            failed += 1
            print(f"{name:9s} FAILED: {str(exc)[:500]}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
