#!/usr/bin/env python
"""Pre-tokenise an SFT dataset into megatron-core indexed datasets (tokens + loss mask).

Creates, next to the input unless --output-prefix is given:
  Tokenized-{dataset}-{tokenizer}-{seq_length}_text_document.{bin,idx}
  Tokenized-{dataset}-{tokenizer}-{seq_length}_loss_mask_document.{bin,idx}
  Tokenized-{dataset}-{tokenizer}-{seq_length}_stats.json

Example:
  python tools/preprocess_data_sft.py --input data/chat.jsonl \\
      --tokenizer-model assets/checkpoints/MyModel --seq-length 16384 --workers 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.sft.data.render_flags import (  # noqa: E402
    add_format_arguments,
    add_reader_arguments,
    add_render_arguments,
    render_config,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io = p.add_argument_group("input / output")
    io.add_argument("input_pos", nargs="?", metavar="INPUT", help="same as --input")
    io.add_argument("--input", help=".jsonl, .json (array or JSON lines), either one also as .gz/.bz2/"
                    ".xz/.zst; .parquet; a folder of those; or an HF save_to_disk folder")
    add_reader_arguments(io)
    io.add_argument("--output-prefix", help="output path prefix (default: "
                    "<input dir>/Tokenized-{dataset}-{tokenizer}-{seq_length})")
    io.add_argument("--force", action="store_true",
                    help="replace a dataset already at the output prefix (without it, an existing "
                    "one is an error: it may have been made with other options)")
    tok = p.add_argument_group("tokenizer and rendering")
    tok.add_argument("--tokenizer-model", required=True,
                     help="HF tokenizer folder (tokenizer.json + tokenizer_config.json)")
    add_render_arguments(tok)
    add_format_arguments(p.add_argument_group("record format (auto-detected unless given)"))
    run = p.add_argument_group("run")
    run.add_argument("--workers", type=int, default=1,
                     help="worker processes; output is identical for any value (default 1)")
    run.add_argument("--chunk-size", type=int, default=256, help="records per worker task")
    run.add_argument("--strict", action="store_true",
                     help="stop with a non-zero exit at the first bad record (default: skip+count)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    input_path = args.input or args.input_pos
    if not input_path:
        parser.error("give the data file with --input (or as the first positional argument).")
    if args.input and args.input_pos:
        parser.error("give the input once: either --input or a positional INPUT, not both.")

    from megatron.sft.data.preprocess import PreprocessConfig, PreprocessError, preprocess
    from megatron.sft.data.readers import InputError

    try:
        render = render_config(args)
        config = PreprocessConfig(input=input_path, tokenizer_model=args.tokenizer_model,
                                  output_prefix=args.output_prefix, render=render,
                                  workers=args.workers, chunk_size=args.chunk_size,
                                  strict=args.strict, split=args.split,
                                  max_record_bytes=args.max_record_bytes,
                                  progress=not args.no_progress, force=args.force)
        stats = preprocess(config)
    except (ValueError, InputError, PreprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output files were published", file=sys.stderr)
        return 130
    s = stats.to_dict()
    print(f"wrote {s['samples_written']} of {s['samples_read']} samples, {s['tokens']:,} tokens "
          f"({s['loss_tokens']:,} learned) at {s['tokens_per_s']:,.0f} tok/s; dropped "
          f"{s['dropped_by_reason'] or 0}; truncated {s['samples_truncated']}")
    print(f"output: {s['output_prefix']}_{{text,loss_mask}}_document.{{bin,idx}} (+ _stats.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
