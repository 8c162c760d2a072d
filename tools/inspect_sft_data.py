#!/usr/bin/env python3
"""Show what an SFT dataset teaches: samples decoded token by token, learned tokens highlighted.

  # a tokenized prefix (what scripts/data/tokenize_dataset.sh wrote); its tokenizer from _stats.json
  python tools/inspect_sft_data.py assets/data/X/Tokenized-X-tok-16384 --random 3
  # a raw file before tokenizing, rendered exactly as the pre-tokenizer would (same flags)
  python tools/inspect_sft_data.py --input data/chat.jsonl --tokenizer-model TOK_DIR --index 0 5
  # histograms of sample lengths (MAX_LEN drawn) and of the learned share per sample
  python tools/inspect_sft_data.py assets/data/X/Tokenized-X-tok-16384 --plot lengths.png

Learned tokens (loss mask 1) are coloured in a terminal and inside [[...]] otherwise. Per sample:
tokens, learned tokens and learned turns (runs of mask 1: an assistant turn + its end-of-turn token).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.sft.cli import run_cli  # noqa: E402
from megatron.sft.data.inspect import COLOR_CHOICES, use_color  # noqa: E402
from megatron.sft.data.render_flags import (  # noqa: E402
    add_format_arguments,
    add_reader_arguments,
    add_render_arguments,
    render_config,
)

#: flags that only change how a raw file is rendered (a prefix already holds its mask)
RAW_ONLY = ("prompt_style", "loss_on", "truncate", "format", "split", "max_record_bytes",
            "messages_field", "role_field", "content_field", "prompt_field", "input_field",
            "response_field", "system_field", "tools_field", "plot_max_records")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to show (a tokenized prefix or --input, one of them)")
    what.add_argument("prefix", nargs="?", metavar="PREFIX",
                      help="tokenized dataset prefix: PREFIX_text_document.bin/.idx, "
                      "PREFIX_loss_mask_document.bin/.idx, PREFIX_stats.json")
    what.add_argument("--input", help="raw data file or folder (as the pre-tokenizer's --input) to "
                      "preview before tokenizing; needs --tokenizer-model")
    what.add_argument("--tokenizer-model", help="HF tokenizer folder; for a prefix the default is "
                      "the one its _stats.json records")
    pick = what.add_mutually_exclusive_group()
    pick.add_argument("--index", type=int, nargs="+", metavar="I",
                      help="sample numbers (records of --input, from 0 in file order) to show "
                      "(default: the first 3)")
    pick.add_argument("--random", type=int, metavar="N", help="show N samples drawn at random")
    what.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    what.add_argument("--color", default="auto", choices=COLOR_CHOICES,
                      help="colour the learned tokens (always), mark them [[...]] (never), or "
                      "colour on a terminal without NO_COLOR (auto, default)")
    plot = p.add_argument_group("plot")
    plot.add_argument("--plot", metavar="FILE.png", help="also write histograms of sample lengths "
                      "(with the MAX_LEN cut-off) and of the learned share per sample")
    plot.add_argument("--plot-max-records", type=int, default=5000,
                      help="with --input: records rendered for --plot (default 5000); a prefix's "
                      "plot uses every sample")
    raw = p.add_argument_group("rendering of --input (the pre-tokenizer's flags)")
    add_reader_arguments(raw)
    add_render_arguments(raw, seq_length_help="MAX_LEN: with --input, as the pre-tokenizer's "
                         "(longer records are shown as dropped); for --plot, the cut-off drawn "
                         "(default for a prefix: the one its _stats.json records)")
    add_format_arguments(raw)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.prefix) == bool(args.input):
        parser.error("give a tokenized PREFIX or --input FILE (with --tokenizer-model), "
                     + ("not both." if args.prefix else "one of them."))
    if args.input and not args.tokenizer_model:
        parser.error("--input needs --tokenizer-model DIR: the raw records are rendered with it.")
    if args.prefix:
        raw_only = [f"--{k.replace('_', '-')}" for k in RAW_ONLY
                    if getattr(args, k) != parser.get_default(k)]
        if raw_only:
            parser.error(f"{', '.join(raw_only)} only apply with --input: a tokenized prefix "
                         "already holds its ids and loss mask.")
    if args.seq_length is not None and args.seq_length < 2:
        parser.error(f"--seq-length must be at least 2 tokens, got {args.seq_length}.")
    color = use_color(args.color, sys.stdout.isatty(), os.environ)

    from megatron.sft.data.inspect_io import PrefixSource, RawSource, format_sample, write_plot

    if args.prefix:
        source = PrefixSource(args.prefix, args.tokenizer_model)
    else:
        source = RawSource(args.input, args.tokenizer_model, render_config(args), args.split,
                           args.max_record_bytes)
    print(source.describe())
    print("learned tokens (loss mask 1) are " + ("highlighted" if color else "inside [[...]]"))
    for sample in source.preview(args.index, args.random, args.seed):
        print(format_sample(sample, source.tokenizer, color), flush=True)
    if args.plot:
        if args.prefix:
            hist, note = source.histograms(args.seq_length), source.plot_note()
        else:
            hist, note = source.histograms(args.seq_length, args.plot_max_records)
        write_plot(args.plot, hist, os.path.basename(args.prefix or args.input), note)
        print(f"wrote {args.plot}: {hist.summary()}")
    return 0


if __name__ == "__main__":
    run_cli(main)
