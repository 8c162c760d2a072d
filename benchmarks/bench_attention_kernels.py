#!/usr/bin/env python3
"""Forward + backward time of our packed attention kernels for the head shapes the 2026 MoE
families bring, beside the dense-model shape the throughput table measures:

  gqa    Qwen2-1.5B per GPU: 12 query heads, 2 KV heads, head dim 128 (the reference)
  sinks  GPT-OSS per GPU at TP1: 64 query heads, 8 KV heads, head dim 64, learnable sinks
         (``model/attention/sinks.py``: out * sigmoid(lse - sink)); every second layer has a
         128-token window, measured as its own row
  mla    DeepSeek-V3 per GPU at TP8: 16 heads, q/k head dim 192 (128 nope + 64 rope), v head
         dim 128 zero-padded to 192 (as ``model/attention/mla.py`` runs it on the packed
         kernels)

Rows are packed with long-tailed documents (``bench_train_gpu.reasoning_lengths``) up to the
sequence length. TFLOP/s counts the causal attention FLOPs of the real documents with the
real (unpadded) head dims: 2·(d_qk + d_v)·h per (query, key) pair forward, x3.5 forward +
backward, so the cost of MLA's v padding and of the sinks shows as a lower rate, not hidden.

  python benchmarks/bench_attention_kernels.py                    # CUDA: varlen and flex, 4k, 16k
  python benchmarks/bench_attention_kernels.py --device cpu --tiny  # dry run of the harness (sdpa)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

#: name -> (query heads, KV heads, q/k head dim, v head dim, sinks, window)
SHAPES = {
    "gqa": (12, 2, 128, 128, False, None),
    "sinks": (64, 8, 64, 64, True, None),
    "sinks-window128": (64, 8, 64, 64, True, 128),
    "mla": (16, 16, 192, 128, False, None),
}
TINY_SHAPES = {"gqa": (4, 2, 16, 16, False, None), "sinks": (4, 2, 16, 16, True, None),
               "sinks-window128": (4, 2, 16, 16, True, 8), "mla": (4, 4, 24, 16, False, None)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="where to run (cpu: only with --tiny, a check of the harness)")
    p.add_argument("--tiny", action="store_true", help="tiny heads and rows (dry run)")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 16384],
                   help="tokens per packed row")
    p.add_argument("--backends", nargs="+", default=None,
                   help="attention backends (default: varlen flex on CUDA, sdpa on CPU)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                   help="head shapes to measure (see above)")
    p.add_argument("--iters", type=int, default=5, help="measured iterations (median)")
    p.add_argument("--warmup", type=int, default=2,
                   help="iterations before measuring (flex compiles in the first)")
    p.add_argument("--output-json", default=None, help="also write the results here")
    return p.parse_args(argv)


def document_bounds(seq: int, seed: int = 0) -> list[int]:
    """``[0, b1, ..., seq]``: long-tailed documents packed into one row until it is full."""
    from bench_train_gpu import reasoning_lengths

    bounds = [0]
    for n in reasoning_lengths(512, seq, seed):
        if bounds[-1] + int(n) > seq:
            break
        bounds.append(bounds[-1] + int(n))
    if bounds[-1] < seq:
        bounds.append(seq)  # the tail is one more (short) document
    return bounds


def attention_flops(bounds: list[int], heads: int, d_qk: int, d_v: int) -> float:
    """Forward + backward FLOPs of causal attention over the documents (x3.5 the forward)."""
    pairs = sum((b - a) * (b - a + 1) / 2 for a, b in zip(bounds[:-1], bounds[1:]))
    return 3.5 * 2 * (d_qk + d_v) * heads * pairs


def measure(backend: str, shape: str, seq: int, args) -> dict:
    from megatron.sft.model.attention import document_segments, get_attention_backend, sinks

    hq, hkv, d_qk, d_v, with_sinks, window = (TINY_SHAPES if args.tiny else SHAPES)[shape]
    if args.tiny and window:
        window = min(window, seq // 4)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = get_attention_backend(backend)
    missing = spec.check("local", device.type)
    if missing:
        return {"status": "skipped", "error": missing}
    bounds = document_bounds(seq)
    cu = torch.tensor([bounds])
    segments = document_segments(cu, 1, seq, device)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(seq, hq, d_qk, generator=gen, device=device, dtype=dtype)
    k = torch.randn(seq, hkv, d_qk, generator=gen, device=device, dtype=dtype)
    v = torch.randn(seq, hkv, d_v, generator=gen, device=device, dtype=dtype)
    sink = torch.randn(hq, generator=gen, device=device, dtype=dtype)
    tensors = [t.requires_grad_() for t in (q, k, v, sink)]
    scale = d_qk ** -0.5
    if with_sinks:
        try:
            kernel = sinks.sink_kernel(backend, 1)
        except ValueError as e:
            return {"status": "skipped", "error": str(e)}
        run = lambda: kernel(q, k, v, segments, scale, window, sink)  # noqa: E731
    else:
        def run():
            vv = v if d_v == d_qk else torch.nn.functional.pad(v, (0, d_qk - d_v))
            return spec.kernel(q, k, vv, segments, scale, window)[..., :d_v]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        for i in range(args.warmup + args.iters):
            sync()
            t0 = time.perf_counter()
            out = run()
            grads = torch.autograd.grad(out.float().sum(), tensors[:3] + ([sink] if with_sinks
                                                                          else []))
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
            del out, grads
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM"}
    ms = statistics.median(times) * 1e3
    flops = attention_flops(bounds, hq, d_qk, d_v)
    return {"status": "ok", "ms": ms, "tflops": flops / (ms / 1e3) / 1e12,
            "documents": len(bounds) - 1,
            "peak_gib": (torch.cuda.max_memory_allocated() / 2**30
                         if device.type == "cuda" else None)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        print("error: --device cpu measures nothing worth quoting; add --tiny for a dry run",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu --tiny for a dry run", file=sys.stderr)
        return 2
    backends = args.backends or (["varlen", "flex"] if args.device == "cuda" else ["sdpa"])
    seqs = [min(s, 256) for s in args.seq_lengths] if args.tiny else args.seq_lengths
    results = []
    print(f"{'shape':<16} {'backend':<7} {'seq':>6} {'docs':>5} {'fwd+bwd':>10} {'TFLOP/s':>8}")
    for seq in seqs:
        for shape in args.shapes:
            for backend in backends:
                r = {"shape": shape, "backend": backend, "seq": seq,
                     **measure(backend, shape, seq, args)}
                results.append(r)
                if r["status"] == "ok":
                    print(f"{shape:<16} {backend:<7} {seq:>6} {r['documents']:>5} "
                          f"{r['ms']:>8.2f}ms {r['tflops']:>8.1f}", flush=True)
                else:
                    print(f"{shape:<16} {backend:<7} {seq:>6}  {r['status']}: "
                          f"{r.get('error', '')}", flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"results": results}, indent=1))
    return 0 if any(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
