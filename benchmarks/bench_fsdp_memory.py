#!/usr/bin/env python3
"""What fully sharded data parallel saves: weight + gradient + optimizer bytes per rank for
plain DDP, the distributed optimizer (ZeRO-1) and Megatron-FSDP's strategies, at several
data-parallel sizes, on the bench_train_step model (Qwen2-shaped, random, 12.4M parameters).

  python benchmarks/bench_fsdp_memory.py [--dp 2,4 --bf16 --hidden 512 --layers 4]

Each (DP size, configuration) is one torchrun launch of DP gloo ranks on CPU that takes one
training step (the optimizer allocates its state there) and counts, on every rank, the bytes of
every storage holding weights, gradient buffers and optimizer state (fp32 main weights that are
not the weights themselves, Adam moments), each storage once (``training.fsdp.state_bytes``).
The table shows the largest rank. Persistent state only: FSDP's transient all-gather buckets
(one layer's weights at a time, plus a prefetched one) and activations are not in it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

#: configuration name -> TrainConfig fields
CONFIGS = {
    "DDP": dict(),
    "distributed optimizer": dict(use_distributed_optimizer=True),
    "FSDP optim": dict(use_megatron_fsdp=True, data_parallel_sharding_strategy="optim"),
    "FSDP optim_grads": dict(use_megatron_fsdp=True,
                             data_parallel_sharding_strategy="optim_grads"),
    "FSDP optim_grads_params": dict(use_megatron_fsdp=True,
                                    data_parallel_sharding_strategy="optim_grads_params"),
}


def measure(config: str, ckpt: str, data: str, out: str, args) -> None:
    """One rank of one configuration: a step, then this rank's bytes to ``out`` (rank 0)."""
    import torch.distributed as dist

    from megatron.sft.runtime.distributed import destroy_distributed
    from megatron.sft.training.arguments import TrainConfig
    from megatron.sft.training.fsdp import state_bytes
    from megatron.sft.training.trainer import Trainer

    dp = int(os.environ["WORLD_SIZE"])
    cfg = TrainConfig(load=ckpt, data_path=data, seq_length=args.seq_length, micro_batch_size=1,
                      global_batch_size=dp, train_iters=1, lr=1e-4, lr_decay_style="constant",
                      no_progress=True, bf16=args.bf16, **CONFIGS[config])
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.setup()
    trainer.train_step()
    mine = state_bytes(trainer.model, trainer.optimizer)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        params = sum(p.numel() for p in trainer.model[0].module.module.parameters()) \
            if cfg.use_megatron_fsdp else sum(p.numel() for p in trainer.model[0].parameters())
        worst = max(every, key=lambda b: sum(b.values()))
        Path(out).write_text(json.dumps({"config": config, "dp": dp, "bytes": worst,
                                         "ranks": every, "parameters": params}))
    destroy_distributed(wait_for_peers=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the model")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the model")
    p.add_argument("--seq-length", type=int, default=128, help="tokens per row")
    p.add_argument("--dp", default="2,4", help="comma-separated data-parallel sizes")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 weights (fp32 main weights in the optimizer); default fp32")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--measure", nargs=4, metavar=("CONFIG", "CKPT", "DATA", "OUT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure(*args.measure, args)
        return 0
    from bench_train_step import make_assets

    root = Path(tempfile.mkdtemp(prefix="bench_fsdp_"))
    ckpt, data = make_assets(root, args)
    configs = [c.strip() for c in args.configs.split(",")]
    rows = []
    for dp in (int(x) for x in args.dp.split(",")):
        for config in configs:
            out = root / f"{dp}_{len(rows)}.json"
            # one launch per configuration: no configuration's buffers linger into another's
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(dp), __file__, *sys.argv[1:], "--measure", config,
                   ckpt, data, str(out)]
            env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                       PYTHONPATH=str(REPO))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                return 1
            rows.append(json.loads(out.read_text()))
    mib = 2 ** 20
    print(f"model: hidden {args.hidden}, {args.layers} layers, {rows[0]['parameters']:,} "
          f"parameters, {'bf16' if args.bf16 else 'fp32'} weights, Adam; bytes on the largest "
          "rank")
    print("| DP | configuration | weights | gradients | optimizer | total | vs distributed "
          "optimizer | vs DDP |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for dp in sorted({r["dp"] for r in rows}):
        group = [r for r in rows if r["dp"] == dp]
        ref = {r["config"]: sum(r["bytes"].values()) for r in group}
        for r in group:
            b = r["bytes"]
            total = sum(b.values())
            ratios = [f"{total / ref[c]:.2f}x" if c in ref else "-"
                      for c in ("distributed optimizer", "DDP")]
            print(f"| {dp} | {r['config']} | {b['params'] / mib:.1f} MiB | "
                  f"{b['grads'] / mib:.1f} MiB | {b['optimizer'] / mib:.1f} MiB | "
                  f"{total / mib:.1f} MiB | {ratios[0]} | {ratios[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
