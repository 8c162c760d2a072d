#!/usr/bin/env python3
"""SFT throughput on one GPU: tokens/s, TFLOP/s, MFU and peak memory per attention backend.

Each configuration runs the real launcher (``tools/train_sft.py`` under torchrun, one process)
on a random Qwen2-1.5B-shaped model (vocab 151,936, 28 layers, hidden 1536, 12 heads, 2 KV
heads; bf16, distributed optimizer) and packed rows drawn from a long-tailed length distribution
like reasoning traces (log-normal, median ~2k tokens, tail to 16k). Numbers are medians over the
iterations after ``--warmup``, read from the run's JSON log; MFU counts attention per document
(``megatron.sft.training.metrics.training_flops``).

  python benchmarks/bench_train_gpu.py                       # every available backend, 4k and 16k
  python benchmarks/bench_train_gpu.py --seq-lengths 4096 --backends varlen flex --recompute none
  python benchmarks/bench_train_gpu.py --device cpu --tiny   # dry run of the whole harness on CPU
  # the chunked loss's effect (the [16k, 152k] logits never whole): peak memory, tokens/s
  python benchmarks/bench_train_gpu.py --seq-lengths 16384 --backends varlen --recompute selective \
      --chunked-loss on off

A configuration that runs out of memory is reported as OOM, not as a failure of the harness.
Results also go to ``--output-json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # bench_assets, when imported as a module

QWEN2_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_theta=10000.0)
#: deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B's config.json (a Qwen2 of Qwen2-1.5B's shape with
#: R1's special-token ids and an unused 4096 sliding window), for benchmarks/gpu_proof.py: the
#: GPU machine gets the repository only, not the downloaded model.
R1_DISTILL_QWEN_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                            num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                            max_position_embeddings=131072, max_window_layers=21,
                            rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096,
                            use_sliding_window=False, tie_word_embeddings=False,
                            hidden_act="silu", attention_dropout=0.0, initializer_range=0.02,
                            bos_token_id=151643, eos_token_id=151643, use_cache=True)
TINY = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="where to train (cpu: a dry run of the same configurations)")
    p.add_argument("--tiny", action="store_true",
                   help="a 2-layer model and short rows: checks the harness, measures nothing")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=None,
                   help="default: 4096 16384 (tiny: 256 512)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="default: every backend that can run here (te varlen flex sdpa dense)")
    p.add_argument("--recompute", nargs="+", default=["none", "selective", "full"],
                   choices=["none", "selective", "full"],
                   help="activation recompute settings to measure (default: all three)")
    p.add_argument("--chunked-loss", nargs="+", default=["auto"], choices=["auto", "on", "off"],
                   help="--chunked-loss settings to measure (default: auto, which is on at 16k "
                        "with this vocabulary)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="rows per forward/backward")
    p.add_argument("--global-batch-size", type=int, default=8, help="rows per optimizer step")
    p.add_argument("--iters", type=int, default=8, help="measured iterations")
    p.add_argument("--warmup", type=int, default=3, help="iterations not measured")
    p.add_argument("--documents", type=int, default=3000, help="synthetic samples to generate")
    p.add_argument("--workdir", default=None, help="keep the model and data here (reused)")
    p.add_argument("--output-json", default=None, help="also write the results table here")
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    return p.parse_args(argv)


def reasoning_lengths(n: int, max_len: int, seed: int = 0):
    """Long-tailed sample lengths: log-normal with median ~2k tokens, clipped to [64, max_len]
    (scaled down proportionally when ``max_len`` < 16k, as in ``--tiny``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    scale = min(1.0, max_len / 16384)
    lengths = rng.lognormal(mean=np.log(2048 * scale), sigma=0.8, size=n)
    return np.clip(lengths, 64 * scale, max_len).astype(np.int64)


def make_assets(work: Path, shape: dict, max_len: int, documents: int) -> tuple[Path, str]:
    """A converted random model and a tokenized dataset of long-tailed documents (made once
    per work directory)."""
    from bench_assets import converted_random_model, random_token_dataset

    ckpt = converted_random_model(work, "Qwen2ForCausalLM", shape)
    prefix = random_token_dataset(str(work / f"data-{max_len}"), shape["vocab_size"],
                                  reasoning_lengths(documents, max_len + 1))
    return ckpt, prefix


def available_backends(device: str) -> list[str]:
    from megatron.sft.model.attention import attention_backends
    from megatron.sft.model.layer_impl import LayerImplError, resolve_layer_impl

    out = []
    for spec in attention_backends():
        impl = "transformer_engine" if spec.needs_te_layers else "auto"
        try:
            resolve_layer_impl(impl, spec.name, device)
        except LayerImplError:
            continue
        out.append(spec.name)
    return out


def run_one(args, ckpt: Path, data: str, seq: int, backend: str, recompute: str,
            work: Path, chunked: str = "auto") -> dict:
    log = work / f"log-{seq}-{backend}-{recompute}-{chunked}.jsonl"
    log.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(REPO / "tools" / "train_sft.py"), "--load", str(ckpt), "--data-path", data,
           "--split", "100,0,0", "--seq-length", str(seq),
           "--micro-batch-size", str(args.micro_batch_size),
           "--global-batch-size", str(args.global_batch_size),
           "--train-iters", str(args.warmup + args.iters), "--lr", "1e-5",
           "--lr-decay-style", "constant", "--use-distributed-optimizer", "--no-progress",
           "--attention-backend", backend, "--log-json", str(log), "--log-interval", "1000",
           "--chunked-loss", chunked]
    if backend == "te":
        cmd += ["--transformer-impl", "transformer_engine"]
    if args.device == "cuda":
        cmd += ["--bf16"]
    if recompute != "none":
        cmd += ["--recompute-granularity", recompute]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    result = {"seq_length": seq, "backend": backend, "recompute": recompute,
              "chunked_loss": chunked, "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        result["status"] = "OOM" if "out of memory" in text.lower() else "error"
        result["error"] = text.strip().splitlines()[-1][:300] if text.strip() else "no output"
        return result
    records = [json.loads(line) for line in log.read_text().splitlines()][args.warmup:]
    result["status"] = "ok"
    for key in ("tokens_per_s", "ms_per_iter", "tflops_per_gpu", "mfu", "max_memory_gib"):
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            result[key] = statistics.median(values) if key != "max_memory_gib" else max(values)
    return result


def _fmt(r: dict) -> str:
    head = (f"{r['seq_length']:>6} {r['backend']:<7} {r['recompute']:<9} "
            f"{r.get('chunked_loss', 'auto'):<7}")
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('error', '')}"
    cells = [head, f"{r['tokens_per_s']:>10.0f}", f"{r['ms_per_iter']:>9.0f}"]
    cells.append(f"{r['tflops_per_gpu']:>8.1f}" if "tflops_per_gpu" in r else f"{'n/a':>8}")
    cells.append(f"{100 * r['mfu']:>6.1f}%" if "mfu" in r else f"{'n/a':>7}")
    cells.append(f"{r['max_memory_gib']:>8.1f}" if "max_memory_gib" in r else f"{'n/a':>8}")
    return " ".join(cells)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron.sft.runtime.distributed import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu --tiny for a dry run", file=sys.stderr)
        return 2
    shape = TINY if args.tiny else QWEN2_1_5B
    seqs = args.seq_lengths or ([256, 512] if args.tiny else [4096, 16384])
    backends = args.backends or available_backends(args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_train_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {device}; model {'tiny' if args.tiny else 'Qwen2-1.5B shape'} "
          f"({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, vocab "
          f"{shape['vocab_size']}); global batch {args.global_batch_size} rows; backends "
          f"{' '.join(backends)}", flush=True)
    print(f"{'seq':>6} {'backend':<7} {'recompute':<9} {'chunked':<7} {'tokens/s':>10} "
          f"{'ms/iter':>9} {'TFLOP/s':>8} {'MFU':>7} {'mem GiB':>8}", flush=True)
    results = []
    for seq in seqs:
        ckpt, data = make_assets(work, shape, seq, args.documents)
        for backend in backends:
            for recompute in args.recompute:
                for chunked in args.chunked_loss:
                    r = run_one(args, ckpt, data, seq, backend, recompute, work, chunked)
                    results.append(r)
                    print(_fmt(r), flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"device": device, "results": results},
                                                     indent=1))
    return 0 if any(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
