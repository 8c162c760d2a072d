#!/usr/bin/env python3
"""Peak memory per rank of ``--load HF_DIR`` (each rank reads only its shard of the
safetensors) against that rank's shard bytes plus the process baseline (goal: <= 1.3x).

  python benchmarks/bench_hf_load_memory.py [--size 0.5b|1.5b] [--tp 2] [--converted]
      [--workdir /tmp/bench_hf_load]

A random bf16 model of the Qwen2-0.5B or DeepSeek-R1-Distill-Qwen-1.5B shape is written
straight to safetensors from the architecture table's shapes (``expected_hf_shapes``), then one torchrun launch of TP gloo ranks on the CPU builds the
trainer's model from it (``model_builder.build_model_from_hf``, bf16) and reports, per rank: the
baseline (resident set after torch, megatron-core and the process group are up, before the
model), the shard (bytes of this rank's parameters) and the peak (``VmHWM``: the high-water
mark of the resident set over the whole process). ``--converted`` also converts the model at the
same layout and measures the same for ``build_model_from_checkpoint`` (the ``mmap``'d rank file),
for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # bench_assets, when imported as a module


#: DeepSeek-R1-Distill-Qwen-1.5B's shape (untied embeddings)
R1_1_5B_CONFIG = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                      num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                      max_position_embeddings=131072, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, rope_theta=10000.0)


from bench_assets import proc_status_bytes  # noqa: E402


def make_model(out: Path, size: str) -> None:
    """A random bf16 Qwen2-shaped model with every tensor the architecture table expects."""
    import torch

    from megatron.sft.bridge.architectures import get_architecture
    from megatron.sft.bridge.random_hf_model import QWEN2_0_5B_CONFIG
    from megatron.sft.bridge.safetensors_io import StreamingShardWriter
    from megatron.sft.bridge.stage_mapping import expected_hf_shapes

    cfg = dict({"0.5b": QWEN2_0_5B_CONFIG, "1.5b": R1_1_5B_CONFIG}[size],
               architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
               torch_dtype="bfloat16")
    spec = get_architecture("Qwen2ForCausalLM")
    shapes = expected_hf_shapes(spec, spec.shape(cfg))
    out.mkdir(parents=True)
    writer = StreamingShardWriter(out / "model.safetensors",
                                  [(n, torch.bfloat16, s) for n, s in shapes.items()])
    gen = torch.Generator().manual_seed(0)
    for n, s in shapes.items():
        writer.write(n, (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16))
    writer.close()
    (out / "config.json").write_text(json.dumps(cfg, indent=2))



def worker(source: str, kind: str, out: str) -> None:
    """One rank: build the model from ``source`` and write its numbers (rank 0 gathers)."""
    import torch
    import torch.distributed as dist

    from megatron.sft.runtime.distributed import destroy_distributed, initialize_distributed
    from megatron.sft.model.layer_impl import resolve_layer_impl
    from megatron.sft.runtime.layout import ParallelLayout
    from megatron.sft.model.builder import (
        build_model_from_checkpoint,
        build_model_from_hf,
    )

    import megatron.core.models.gpt  # noqa: F401  (imported before the baseline is taken)

    initialize_distributed(ParallelLayout(int(os.environ["WORLD_SIZE"]), 1), seed=0)
    impl = resolve_layer_impl("local", "sdpa", "cpu")
    dist.barrier()
    baseline = proc_status_bytes("VmRSS")
    build = dict(impl=impl, params_dtype=torch.bfloat16, seq_length=1024)
    if kind == "hf":
        chunks, _ = build_model_from_hf(source, log=lambda m: None, **build)
    else:
        chunks, _, _ = build_model_from_checkpoint(source, **build)
    peak = proc_status_bytes("VmHWM")
    shard = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    mine = {"rank": dist.get_rank(), "baseline": baseline, "shard": shard, "peak": peak}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(every))
    destroy_distributed()


def launch(tp: int, source: Path, kind: str, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(tp), __file__, "--worker", kind, "--source", str(source), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (default: 2)")
    p.add_argument("--size", choices=["0.5b", "1.5b"], default="0.5b",
                   help="model shape: Qwen2-0.5B or DeepSeek-R1-Distill-Qwen-1.5B (default 0.5b)")
    p.add_argument("--workdir", default="/tmp/bench_hf_load",
                   help="where the random model goes (default: /tmp/bench_hf_load)")
    p.add_argument("--converted", action="store_true",
                   help="also measure loading the converted checkpoint at the same layout")
    p.add_argument("--worker", choices=["hf", "converted"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--source", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--make-model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make_model:
        make_model(Path(args.make_model), args.size)
        return 0
    if args.worker:
        worker(args.source, args.worker, args.out)
        return 0
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    hf = work / "hf"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # the model is made in a child process, so this one stays small
    subprocess.run([sys.executable, __file__, "--make-model", str(hf), "--size", args.size],
                   env=env, check=True)
    gib = 1 << 30
    model = (hf / "model.safetensors").stat().st_size
    kind = {"0.5b": "Qwen2-0.5B", "1.5b": "DeepSeek-R1-Distill-Qwen-1.5B"}[args.size]
    print(f"model: {kind}-shaped, bf16, {model / gib:.3f} GiB of tensors; TP{args.tp} on "
          f"{args.tp} gloo ranks; {os.cpu_count()} CPUs")
    runs = {"--load HF_DIR": launch(args.tp, hf, "hf", work / "hf.json")}
    if args.converted:
        ckpt = work / "megatron"
        subprocess.run([sys.executable, str(REPO / "tools/convert_hf_to_megatron.py"),
                        "--load-dir", str(hf), "--save-dir", str(ckpt),
                        "--target-tensor-parallel-size", str(args.tp), "--no-progress"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        runs["--load converted"] = launch(args.tp, ckpt, "converted", work / "converted.json")
    for name, ranks in runs.items():
        for r in ranks:
            ratio = r["peak"] / (r["baseline"] + r["shard"])
            print(f"{name:17s} rank {r['rank']}: baseline {r['baseline'] / gib:.3f} GiB + shard "
                  f"{r['shard'] / gib:.3f} GiB = {(r['baseline'] + r['shard']) / gib:.3f} GiB; "
                  f"peak {r['peak'] / gib:.3f} GiB = {ratio:.2f}x (goal <= 1.3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
