#!/usr/bin/env python3
"""Overhead of our full SFT step over bare megatron-core forward/backward (CPU or GPU).

Both sides run the same model, optimizer and pipeline schedule on the same global batch:

- ours:  Trainer.train_step(): dataset rows -> packing -> collate -> block-diagonal mask ->
         forward -> padded-vocab-masked per-token loss -> backward -> optimizer step;
- bare:  micro-batches prepared once up front, then forward with megatron-core's own loss
         (``labels=``) -> masked sum -> backward -> optimizer step.

  python benchmarks/bench_train_step.py [--hidden 512 --layers 4 --seq-length 1024 --iters 10]

Goal (issue 4): overhead <= 5 %.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def make_assets(root: Path, args) -> tuple[str, str]:
    from transformers import AutoTokenizer

    from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
    from megatron.sft.bridge.random_hf_model import make_random_hf_model
    from megatron.sft.data.preprocess import PreprocessConfig, preprocess
    from megatron.sft.data.tiny_tokenizer import save_tiny_tokenizer
    from sft_testing import write_arithmetic_conversations

    tok = save_tiny_tokenizer(root / "tok", template="chatml")
    write_arithmetic_conversations(root / "chat.jsonl", 2000, seed=0)
    preprocess(PreprocessConfig(input=str(root / "chat.jsonl"), tokenizer_model=str(tok),
                                output_prefix=str(root / "ds"), progress=False))
    hf = make_random_hf_model("Qwen2ForCausalLM", root / "hf", overrides=dict(
        vocab_size=len(AutoTokenizer.from_pretrained(tok)), hidden_size=args.hidden,
        intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256)))
    convert_hf_to_megatron(hf, root / "mg", ConvertOptions(progress=False))
    return str(root / "mg"), str(root / "ds")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the model")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the model")
    p.add_argument("--seq-length", type=int, default=1024, help="tokens per row")
    p.add_argument("--micro-batch-size", type=int, default=2, help="rows per forward/backward")
    p.add_argument("--global-batch-size", type=int, default=4, help="rows per optimizer step")
    p.add_argument("--iters", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="steps run before measuring")
    args = p.parse_args()
    import torch

    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    ckpt, data = make_assets(root, args)
    from megatron.sft.training.arguments import TrainConfig
    from megatron.sft.training.batch import microbatch_rows
    from megatron.sft.training.trainer import Trainer

    total_iters = 2 * (args.iters + args.warmup) + 2
    cfg = TrainConfig(load=ckpt, data_path=data, seq_length=args.seq_length,
                      micro_batch_size=args.micro_batch_size,
                      global_batch_size=args.global_batch_size, train_iters=total_iters,
                      lr=1e-4, lr_decay_style="constant", no_progress=True)
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.setup()
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def ours() -> float:
        t0 = time.perf_counter()
        trainer.train_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    fixed = trainer._microbatches(trainer.train_ds, microbatch_rows(
        0, cfg.global_batch_size, cfg.micro_batch_size, 0, 1))

    def bare_forward_step(data_iterator, model):
        b = next(data_iterator)
        per_token = model(b["tokens"], b["position_ids"],
                          attention_mask=b["attention"].attention_mask,
                          packed_seq_params=b["attention"].packed_seq_params, labels=b["labels"])

        def loss_func(out):
            mask = b["loss_mask"].float()
            s = (out.float() * mask).sum()
            return s, mask.sum().to(torch.int64), {"lm loss": torch.stack([s.detach(), mask.sum()])}

        return per_token, loss_func

    def bare() -> float:
        t0 = time.perf_counter()
        for m in trainer.model:
            m.zero_grad_buffer()
        trainer.optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=bare_forward_step, data_iterator=iter(fixed),
            model=trainer.model[0], num_microbatches=len(fixed), seq_length=cfg.seq_length,
            micro_batch_size=cfg.micro_batch_size, forward_only=False)
        trainer.optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    ours_t, bare_t = [], []
    for i in range(args.warmup + args.iters):  # interleave so drift hits both equally
        a, b = ours(), bare()
        if i >= args.warmup:
            ours_t.append(a)
            bare_t.append(b)
    mo, mb = statistics.median(ours_t), statistics.median(bare_t)
    params = sum(p.numel() for p in trainer.model[0].parameters())
    print(f"model: {params / 1e6:.1f}M params, hidden {args.hidden}, {args.layers} layers, seq "
          f"{args.seq_length}, {cfg.global_batch_size}x{cfg.seq_length} tokens/step "
          f"({len(fixed)} micro-batches of {cfg.micro_batch_size}); device "
          f"{trainer.info.device}, torch threads {torch.get_num_threads()}")
    print(f"ours (data+packing+mask+masked loss+step): median {mo * 1e3:.1f} ms/iter "
          f"(min {min(ours_t) * 1e3:.1f})")
    print(f"bare megatron-core fwd/bwd+step:          median {mb * 1e3:.1f} ms/iter "
          f"(min {min(bare_t) * 1e3:.1f})")
    print(f"overhead: {100 * (mo / mb - 1):+.1f}% (goal <= 5%)")
    from megatron.sft.runtime.distributed import destroy_distributed

    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
