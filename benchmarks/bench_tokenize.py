#!/usr/bin/env python
"""Benchmark SFT pre-tokenisation: throughput vs raw batch-encode, and peak RSS vs input size.

What it measures (all data and the tokenizer are generated here; no network):

1. tokens/s of ``tools/preprocess_data_sft.py``'s pipeline (JSON parse, chat-template rendering,
   tokenisation with offsets, loss masks, .bin/.idx writing) with ``--workers W``;
2. tokens/s of a raw baseline: the *same* tokenizer batch-encoding the *same* rendered texts
   with the same number of processes (texts rendered beforehand, outside the timing);
   goal: ratio (1) / (2) >= 0.7. Both arms run ``--repeats`` times, alternating, and the ratio
   uses the median of each, so a burst of load from another process skews neither arm alone;
3. peak RSS of the largest process of a full CLI run on N and 10 x N samples; goal: flat.

Usage:
  python benchmarks/bench_tokenize.py [--samples 20000] [--workers 2] [--vocab-size 4000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron.sft.data.preprocess import PreprocessConfig, load_tokenizer, preprocess  # noqa: E402
from megatron.sft.data.render import ConversationRenderer, RenderConfig  # noqa: E402
from megatron.sft.data.tiny_tokenizer import save_tiny_tokenizer  # noqa: E402

WORDS = ("the model learns to answer questions about science history code and maths with short "
         "clear steps because careful reasoning helps users trust each result so we test many "
         "different sentences numbers 0 1 2 3 42 1999 and symbols like + - = ( ) : ; ! ?").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_dataset(path: Path, samples: int, seed: int = 0) -> None:
    """Multi-turn chats; the answer length is log-normal (a few hundred tokens, long tail)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(samples):
            turns = [{"role": "system", "content": "You are a helpful assistant."}]
            for _ in range(rng.choice((1, 1, 2))):
                turns.append({"role": "user", "content": sentence(rng, rng.randint(8, 40))})
                turns.append({"role": "assistant",
                              "content": sentence(rng, min(3000, int(rng.lognormvariate(4.5, 0.7))))})
            f.write(json.dumps({"messages": turns}) + "\n")


_BACKEND = None


def _init_raw(tokenizer_dir: str) -> None:
    global _BACKEND
    _BACKEND = load_tokenizer(tokenizer_dir).backend_tokenizer


def _encode_raw(texts: list[str]) -> int:
    return sum(len(e.ids) for e in _BACKEND.encode_batch(texts, add_special_tokens=False))


def raw_encode_tokens_per_s(tokenizer_dir: str, texts: list[str], workers: int, chunk: int) -> float:
    start = time.perf_counter()
    chunks = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
    if workers == 1:
        _init_raw(tokenizer_dir)
        total = sum(_encode_raw(c) for c in chunks)
    else:
        with mp.get_context("fork").Pool(workers, _init_raw, (tokenizer_dir,)) as pool:
            total = sum(pool.imap(_encode_raw, chunks))
    return total / (time.perf_counter() - start)


def millions(rates: list[float]) -> str:
    """[1234567.0, 2e6] -> '1.23M, 2.00M'"""
    return ", ".join(f"{r / 1e6:.2f}M" for r in rates)


def peak_rss_mb_of_cli(data: Path, tokenizer_dir: Path, workers: int, out: Path) -> float:
    """Max RSS of the largest process (the CLI or one of its workers), via a fresh subprocess."""
    code = (
        "import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    cmd = [sys.executable, "-c", code, sys.executable, str(REPO / "tools/preprocess_data_sft.py"),
           "--input", str(data), "--tokenizer-model", str(tokenizer_dir), "--workers", str(workers),
           "--output-prefix", str(out), "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20000, help="samples for the throughput run")
    p.add_argument("--rss-samples", type=int, default=4000, help="N for the N vs 10N memory runs")
    p.add_argument("--workers", type=int, default=2,
                   help="worker processes of both the pre-tokenizer and the raw baseline")
    p.add_argument("--vocab-size", type=int, default=4000,
                   help="vocabulary of the BPE tokenizer trained for the run")
    p.add_argument("--chunk-size", type=int, default=256, help="records per task, both arms")
    p.add_argument("--repeats", type=int, default=3, help="runs of each arm; the median counts")
    args = p.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # processes, not Rust threads, in both arms

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = [sentence(random.Random(i), 60) for i in range(2000)]
        tok_dir = save_tiny_tokenizer(tmp / "tok", template="chatml", corpus=corpus, vocab_size=args.vocab_size)
        data = tmp / "bench.jsonl"
        write_dataset(data, args.samples)
        print(f"machine: {os.cpu_count()} CPUs | workers={args.workers} | tokenizer: byte-level BPE, "
              f"vocab {args.vocab_size}, ChatML template | data: {args.samples} chats, "
              f"{data.stat().st_size / 2**20:.1f} MiB")

        renderer = ConversationRenderer(load_tokenizer(str(tok_dir)), RenderConfig())
        with open(data) as f:
            texts = [renderer.render_text(json.loads(line)).text for line in f]
        ours_runs, raw_runs = [], []
        for _ in range(args.repeats):
            stats = preprocess(PreprocessConfig(input=str(data), tokenizer_model=str(tok_dir),
                                                output_prefix=str(tmp / "out"), workers=args.workers,
                                                chunk_size=args.chunk_size, progress=False,
                                                force=True))  # each repeat replaces the last
            ours_runs.append(stats.tokens / stats.elapsed_s)
            raw_runs.append(raw_encode_tokens_per_s(str(tok_dir), texts, args.workers, args.chunk_size))
        ours, raw = statistics.median(ours_runs), statistics.median(raw_runs)
        print(f"pre-tokenisation : {stats.tokens:,} tokens, median {ours:,.0f} tokens/s over {args.repeats} runs "
              f"[{millions(ours_runs)}] (samples written {stats.samples_written}, loss tokens {stats.loss_tokens:,})")
        print(f"raw batch-encode : median {raw:,.0f} tokens/s [{millions(raw_runs)}] (same tokenizer, same rendered "
              f"text, {args.workers} processes)")
        print(f"ratio            : {ours / raw:.2f}x  (goal >= 0.70x)")

        rss = []
        for n in (args.rss_samples, 10 * args.rss_samples):
            sized = tmp / f"rss_{n}.jsonl"
            write_dataset(sized, n, seed=1)
            rss.append(peak_rss_mb_of_cli(sized, tok_dir, args.workers, tmp / f"rss_{n}"))
            print(f"peak RSS         : {n:>7,} samples ({sized.stat().st_size / 2**20:6.1f} MiB input) -> "
                  f"{rss[-1]:.0f} MiB (largest process)")
            sized.unlink()
        print(f"RSS growth 10x input: {rss[1] / rss[0]:.2f}x  (goal: flat, ~1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
