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

from megatron.sft.data.formats import FORMATS, RECORD_FORMATS, FieldMap  # noqa: E402
from megatron.sft.data.prompt_styles import PROMPT_STYLES  # noqa: E402
from megatron.sft.data.readers import DEFAULT_MAX_RECORD_BYTES  # noqa: E402
from megatron.sft.data.render import LOSS_ON, RenderConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io = p.add_argument_group("input / output")
    io.add_argument("input_pos", nargs="?", metavar="INPUT", help="same as --input")
    io.add_argument("--input", help=".jsonl, .json (array or JSON lines), either one also as .gz/.bz2/"
                    ".xz/.zst; .parquet; a folder of those; or an HF save_to_disk folder")
    io.add_argument("--split", help="split to read from an HF DatasetDict folder (default: train)")
    io.add_argument("--output-prefix", help="output path prefix (default: "
                    "<input dir>/Tokenized-{dataset}-{tokenizer}-{seq_length})")
    io.add_argument("--force", action="store_true",
                    help="replace a dataset already at the output prefix (without it, an existing "
                    "one is an error: it may have been made with other options)")
    tok = p.add_argument_group("tokenizer and rendering")
    tok.add_argument("--tokenizer-model", required=True,
                     help="HF tokenizer folder (tokenizer.json + tokenizer_config.json)")
    tok.add_argument("--prompt-style", default="chat-template", choices=PROMPT_STYLES,
                     help="chat-template: the tokenizer's own template (default); alpaca: the "
                     "classic 'Below is an instruction...' layout + EOS; chatml: <|im_start|> turns")
    tok.add_argument("--loss-on", default="assistant", choices=LOSS_ON,
                     help="which tokens are learned: every assistant turn + its end-of-turn token "
                     "(default), only the last assistant turn, or all tokens")
    tok.add_argument("--seq-length", type=int, default=None,
                     help="maximum tokens per sample; longer samples are dropped (or truncated "
                     "with --truncate) and counted")
    tok.add_argument("--truncate", action="store_true",
                     help="keep the first --seq-length tokens of long samples instead of dropping")
    fmt = p.add_argument_group("record format (auto-detected unless given)")
    fmt.add_argument("--format", default="auto", choices=FORMATS,
                     help="; ".join(f"{f.name}: {f.example}" for f in RECORD_FORMATS.values()))
    for name, what in (("messages", "list of turns"), ("role", "role inside a turn"),
                       ("content", "text inside a turn"), ("prompt", "alpaca instruction"),
                       ("input", "alpaca input"), ("response", "alpaca response"),
                       ("system", "top-level system prompt (default: system)"),
                       ("tools", "top-level tool definitions passed to the chat template "
                                 "(default: tools)")):
        fmt.add_argument(f"--{name}-field", help=f"custom key of the {what}")
    run = p.add_argument_group("run")
    run.add_argument("--workers", type=int, default=1,
                     help="worker processes; output is identical for any value (default 1)")
    run.add_argument("--chunk-size", type=int, default=256, help="records per worker task")
    run.add_argument("--max-record-bytes", type=int, default=DEFAULT_MAX_RECORD_BYTES,
                     help="JSON lines longer than this are dropped as record_too_large without "
                     f"being parsed or read into memory (default {DEFAULT_MAX_RECORD_BYTES >> 20} MiB)")
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
        fields = FieldMap(messages=args.messages_field, role=args.role_field,
                          content=args.content_field, prompt=args.prompt_field,
                          input=args.input_field, response=args.response_field,
                          system=args.system_field, tools=args.tools_field)
        render = RenderConfig(prompt_style=args.prompt_style, loss_on=args.loss_on,
                              max_length=args.seq_length, truncate=args.truncate,
                              format=args.format, fields=fields)
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
