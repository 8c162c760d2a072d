#!/usr/bin/env python3
"""What LoRA saves: optimizer state, gradient buffers and step time, full fine-tuning vs LoRA
ranks, on the bench_train_step model (Qwen2-shaped, random, fp32, one CPU process).

  python benchmarks/bench_lora_memory.py [--hidden 512 --layers 4 --ranks 8,64 --iters 3]

Optimizer state = bytes of every tensor in the optimizer's per-parameter state after a step
(Adam: two fp32 moments per trainable element); grad buffers = megatron-core DDP's buffers.
Step memory = the peak over the first (optimizer-allocating) step and the timed ones: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the process's peak resident set (Linux VmHWM, reset
just before the first step), shown as the peak and as its growth over the resident set before
the step (model, data and framework). Each configuration runs in its own process, so one
configuration's freed memory never hides another's peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


from bench_assets import proc_status_bytes  # noqa: E402


def measure(ckpt: str, data: str, rank: int, args) -> dict:
    from megatron.sft.training.arguments import TrainConfig
    from megatron.sft.training.trainer import Trainer

    cfg = TrainConfig(load=ckpt, data_path=data, seq_length=args.seq_length,
                      micro_batch_size=1, global_batch_size=2, train_iters=args.iters + 1,
                      lr=1e-4, lr_decay_style="constant", no_progress=True, lora_rank=rank,
                      lora_alpha=2.0 * max(rank, 1), transformer_impl="local")
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.setup()
    before = _memory_now()
    _reset_peak()
    trainer.train_step()  # allocates the optimizer state
    t0 = time.perf_counter()
    for _ in range(args.iters):
        trainer.train_step()
    step = (time.perf_counter() - t0) / args.iters
    peak = _peak_memory()
    state = sum(t.numel() * t.element_size()
                for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
                for st in opt.optimizer.state.values() for t in st.values()
                if hasattr(t, "dim") and t.dim() > 0)
    grads = sum(b.grad_data.numel() * b.grad_data.element_size()
                for m in trainer.model for b in m.buffers)
    trainable = sum(p.numel() for m in trainer.model for p in m.parameters() if p.requires_grad)
    total = sum(p.numel() for m in trainer.model for p in m.parameters())
    return dict(rank=rank, trainable=trainable, total=total, optimizer_state=state,
                grad_buffers=grads, step_s=step, memory_before=before, step_peak=peak,
                memory_kind="CUDA allocated" if torch.cuda.is_available() else "CPU resident")



def _memory_now() -> int:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    return proc_status_bytes("VmRSS")


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (Linux >= 4.0)
        f.write("5")


def _peak_memory() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return proc_status_bytes("VmHWM")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the model")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the model")
    p.add_argument("--seq-length", type=int, default=512, help="tokens per row")
    p.add_argument("--ranks", default="8,64",
                   help="comma-separated LoRA ranks to measure beside full fine-tuning")
    p.add_argument("--iters", type=int, default=3,
                   help="steps after the first (optimizer-allocating) one")
    p.add_argument("--measure", nargs=3, metavar=("RANK", "CKPT", "DATA"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:  # one configuration per process: models of earlier runs skew the timing
        rank, ckpt, data = args.measure
        print(json.dumps(measure(ckpt, data, int(rank), args)))
        return 0
    from bench_train_step import make_assets

    ckpt, data = make_assets(Path(tempfile.mkdtemp(prefix="bench_lora_")), args)
    rows = []
    for r in [0] + [int(x) for x in args.ranks.split(",")]:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--measure", str(r), ckpt,
                              data], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"model: hidden {args.hidden}, {args.layers} layers, {rows[0]['total']:,} parameters")
    print(f"step memory: {rows[0]['memory_kind']}")
    print("| run | trainable | optimizer state | grad buffers | step peak | step peak - before "
          "| s/step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name = "full" if r["rank"] == 0 else f"LoRA r{r['rank']}"
        print(f"| {name} | {r['trainable']:,} | {r['optimizer_state'] / 2**20:.2f} MiB | "
              f"{r['grad_buffers'] / 2**20:.2f} MiB | {r['step_peak'] / 2**20:.0f} MiB | "
              f"{(r['step_peak'] - r['memory_before']) / 2**20:.0f} MiB | {r['step_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
