#!/usr/bin/env python
"""Benchmark SFT pre-tokenisation: throughput vs raw batch-encode, and peak RSS vs input size.

What it measures (all data and the tokenizer are generated here; no network):

1. tokens/s of ``tools/preprocess_data_sft.py``'s pipeline (JSON parse, chat-template rendering,
   tokenisation with offsets, loss masks, .bin/.idx writing) with ``--workers W``, timed by the
   run itself from the end of its set-up (imports, tokenizer load, worker start) to the end;
2. tokens/s of a raw baseline in the same run: the *same* tokenizer (``tokenizers``, from its
   tokenizer.json) batch-encoding the *same* rendered texts with the same number of processes
   (texts rendered beforehand; the clock starts once every process has loaded the tokenizer);
   goal: ratio (1) / (2) >= 1.2. Both arms run ``--repeats`` times, alternating, and the ratio
   uses the median of each, so a burst of load from another process skews neither arm alone;
3. start-up: wall time of the CLI on a one-record file (median of ``--repeats``); goal <= 3 s;
4. peak RSS of the largest process of a full CLI run on N and 10 x N samples; goal: flat.

Usage:
  python benchmarks/bench_tokenize.py [--samples 20000] [--workers 2] [--vocab-size 4000] [--repeats 3]
  python benchmarks/bench_tokenize.py --data r1 --samples 24000 --rss-samples 0 \\
      --tokenizer /work/shared/assets/deepseek_r1_tokenizer/tokenizer.json.gz \\
      --chat-template .../r1_template_original.jinja --chat-template .../r1_template_edited.jinja
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import random
import shutil
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


def r1_record(rng: random.Random) -> dict:
    """One R1-style hybrid-reasoning chat: 2-8 turns; most assistant turns carry their thinking
    in ``reasoning_content`` (each then located by re-rendering), a few inline as
    ``<think>...</think>`` in the content, the rest answer without thinking."""
    msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(2, 8)):
        msgs.append({"role": "user", "content": sentence(rng, rng.randint(6, 20))})
        turn = {"role": "assistant", "content": sentence(rng, rng.randint(8, 30))}
        mode = rng.random()
        if mode < 0.8:
            turn["reasoning_content"] = sentence(rng, rng.randint(20, 60))
        elif mode < 0.9:
            turn["content"] = f"<think>\n{sentence(rng, rng.randint(20, 60))}\n</think>\n\n{turn['content']}"
        msgs.append(turn)
    return {"messages": msgs}


def write_r1_dataset(path: Path, samples: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(samples):
            f.write(json.dumps(r1_record(rng)) + "\n")


def tokenizer_dirs(args, tmp: Path) -> list[tuple[str, Path]]:
    """(label, folder) per tokenizer to measure: a trained BPE, a given folder, or a
    ``tokenizer.json[.gz]`` with each ``--chat-template`` (config as the asset README gives it)."""
    if args.tokenizer is None:
        corpus = [sentence(random.Random(i), 60) for i in range(2000)]
        folder = save_tiny_tokenizer(tmp / "tok", template="chatml", corpus=corpus, vocab_size=args.vocab_size)
        return [(f"byte-level BPE, vocab {args.vocab_size}, ChatML template", Path(folder))]
    src = Path(args.tokenizer)
    if src.is_dir():
        return [(src.name, src)]
    out = []
    for template in args.chat_template or ():
        folder = tmp / f"tok-{Path(template).stem}"
        folder.mkdir()
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rb") as fi, open(folder / "tokenizer.json", "wb") as fo:
            shutil.copyfileobj(fi, fo)
        config = dict(R1_TOKENIZER_CONFIG, chat_template=Path(template).read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
        out.append((f"{src.name}, {Path(template).name}", folder))
    if not out:
        sys.exit("--tokenizer tokenizer.json[.gz] needs at least one --chat-template FILE")
    return out


#: what the asset README gives for DeepSeek's tokenizer
R1_TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<｜begin▁of▁sentence｜>",
                       "eos_token": "<｜end▁of▁sentence｜>", "pad_token": "<｜end▁of▁sentence｜>",
                       "add_bos_token": False, "add_eos_token": False, "model_max_length": 16384}

_BACKEND = None


def _init_raw(tokenizer_json: str) -> None:
    global _BACKEND
    from tokenizers import Tokenizer

    _BACKEND = Tokenizer.from_file(tokenizer_json)


def _encode_raw(texts: list[str]) -> int:
    return sum(len(e.ids) for e in _BACKEND.encode_batch(texts, add_special_tokens=False))


def raw_encode_tokens_per_s(tokenizer_json: str, texts: list[str], workers: int, chunk: int) -> float:
    """The tokenizer alone: ``encode_batch`` (ids and offsets) of the rendered texts in chunks,
    ``workers`` processes; the clock starts once every process has loaded the tokenizer."""
    chunks = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
    if workers == 1:
        _init_raw(tokenizer_json)
        start = time.perf_counter()
        total = sum(_encode_raw(c) for c in chunks)
        return total / (time.perf_counter() - start)
    with mp.get_context("fork").Pool(workers, _init_raw, (tokenizer_json,)) as pool:
        pool.map(_encode_raw, [["warm up"]] * workers, chunksize=1)  # every worker is loaded
        start = time.perf_counter()
        total = sum(pool.imap(_encode_raw, chunks))
        return total / (time.perf_counter() - start)


def startup_s(tokenizer_dir: Path, tmp: Path, workers: int, repeats: int) -> list[float]:
    """Wall seconds of the whole CLI on a one-record file (imports, tokenizer load, pool, write)."""
    one = tmp / "one.jsonl"
    write_r1_dataset(one, 1)
    times = []
    for _ in range(repeats):
        cmd = [sys.executable, str(REPO / "tools/preprocess_data_sft.py"), "--input", str(one),
               "--tokenizer-model", str(tokenizer_dir), "--workers", str(workers),
               "--output-prefix", str(tmp / "one"), "--no-progress", "--force"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return times


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
    p.add_argument("--data", choices=("chat", "r1"), default="chat",
                   help="chat: ChatML-style multi-turn chats; r1: R1 hybrid-reasoning chats")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer folder, or a tokenizer.json[.gz] used with each --chat-template "
                        "(default: a byte-level BPE trained here)")
    p.add_argument("--chat-template", action="append", help="a .jinja template (repeatable)")
    p.add_argument("--rss-samples", type=int, default=4000,
                   help="N for the N vs 10N memory runs (0: skip them)")
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
        data = tmp / "bench.jsonl"
        (write_r1_dataset if args.data == "r1" else write_dataset)(data, args.samples)
        for label, tok_dir in tokenizer_dirs(args, tmp):
            print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} | "
                  f"workers={args.workers} | tokenizer: {label} | data: {args.samples} {args.data} "
                  f"records, {data.stat().st_size / 2**20:.1f} MiB")
            ratio_run(args, data, tok_dir, tmp)
            starts = startup_s(tok_dir, tmp, args.workers, args.repeats)
            print(f"start-up         : median {statistics.median(starts):.2f} s "
                  f"[{', '.join(f'{t:.2f}' for t in starts)}] for the CLI on a one-record file "
                  "(goal <= 3 s)")
        if args.rss_samples:
            rss_run(args, tok_dir, tmp)
    return 0


def ratio_run(args, data: Path, tok_dir: Path, tmp: Path) -> None:
    """Both arms ``--repeats`` times, alternating; each median is taken over its own runs, so a
    burst of load from another process skews neither arm alone. The pre-tokenizer's own clock
    (``stats.elapsed_s``) starts after its set-up (imports, tokenizer load, worker start)."""
    renderer = ConversationRenderer(load_tokenizer(str(tok_dir)), RenderConfig())
    with open(data) as f:
        texts = [renderer.render_text(json.loads(line)).text for line in f]
    ours_runs, raw_runs = [], []
    for _ in range(args.repeats):
        stats = preprocess(PreprocessConfig(input=str(data), tokenizer_model=str(tok_dir),
                                            output_prefix=str(tmp / "out"), workers=args.workers,
                                            chunk_size=args.chunk_size, progress=False,
                                            force=True), log=lambda _: None)  # replaces the last
        ours_runs.append(stats.tokens / stats.elapsed_s)
        raw_runs.append(raw_encode_tokens_per_s(str(tok_dir / "tokenizer.json"), texts,
                                                args.workers, args.chunk_size))
    ours, raw = statistics.median(ours_runs), statistics.median(raw_runs)
    print(f"pre-tokenisation : {stats.tokens:,} tokens, median {ours:,.0f} tokens/s over {args.repeats} runs "
          f"[{millions(ours_runs)}] (samples written {stats.samples_written}, loss tokens {stats.loss_tokens:,})")
    print(f"raw batch-encode : median {raw:,.0f} tokens/s [{millions(raw_runs)}] (same tokenizer, same rendered "
          f"text, {args.workers} processes)")
    print(f"ratio            : {ours / raw:.2f}x  (goal >= 1.2x)")


def rss_run(args, tok_dir: Path, tmp: Path) -> None:
    rss = []
    for n in (args.rss_samples, 10 * args.rss_samples):
        sized = tmp / f"rss_{n}.jsonl"
        (write_r1_dataset if args.data == "r1" else write_dataset)(sized, n, seed=1)
        rss.append(peak_rss_mb_of_cli(sized, tok_dir, args.workers, tmp / f"rss_{n}"))
        print(f"peak RSS         : {n:>7,} samples ({sized.stat().st_size / 2**20:6.1f} MiB input) -> "
              f"{rss[-1]:.0f} MiB (largest process)")
        sized.unlink()
    print(f"RSS growth 10x input: {rss[1] / rss[0]:.2f}x  (goal: flat, ~1.0x)")


if __name__ == "__main__":
    sys.exit(main())
