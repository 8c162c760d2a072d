"""The command-line flags that decide how records are read and become token ids + loss mask.

Defined once for the pre-tokenizer (``tools/preprocess_data_sft.py``) and the preview
(``tools/inspect_sft_data.py``), so a preview renders with exactly the options, spellings and
defaults the pre-tokenizer takes. Example::

    p = argparse.ArgumentParser()
    add_reader_arguments(p.add_argument_group("input"))
    add_render_arguments(p.add_argument_group("tokenizer and rendering"))
    add_format_arguments(p.add_argument_group("record format (auto-detected unless given)"))
    render_config(p.parse_args(["--loss-on", "last-assistant"]))
    # -> RenderConfig(prompt_style='chat-template', loss_on='last-assistant', ...)
"""

from __future__ import annotations

import argparse

from megatron.sft.data.formats import FORMATS, RECORD_FORMATS, FieldMap
from megatron.sft.data.prompt_styles import PROMPT_STYLES
from megatron.sft.data.readers import DEFAULT_MAX_RECORD_BYTES
from megatron.sft.data.render import LOSS_ON, RenderConfig

#: (flag stem, what the custom key names): ``--messages-field`` ... ``--tools-field``
CUSTOM_FIELDS = (("messages", "list of turns"), ("role", "role inside a turn"),
                 ("content", "text inside a turn"), ("prompt", "alpaca instruction"),
                 ("input", "alpaca input"), ("response", "alpaca response"),
                 ("system", "top-level system prompt (default: system)"),
                 ("tools", "top-level tool definitions passed to the chat template (default: tools)"))


def add_reader_arguments(group: argparse._ActionsContainer) -> None:
    """``--split``, ``--max-record-bytes``: which records the readers yield."""
    group.add_argument("--split", help="split to read from an HF DatasetDict folder (default: train)")
    group.add_argument("--max-record-bytes", type=int, default=DEFAULT_MAX_RECORD_BYTES,
                       help="JSON lines longer than this are dropped as record_too_large without "
                       f"being parsed or read into memory (default {DEFAULT_MAX_RECORD_BYTES >> 20} MiB)")


def add_render_arguments(group: argparse._ActionsContainer, seq_length_help: str | None = None) -> None:
    """``--prompt-style``, ``--loss-on``, ``--seq-length``, ``--truncate``."""
    group.add_argument("--prompt-style", default="chat-template", choices=PROMPT_STYLES,
                       help="chat-template: the tokenizer's own template (default); alpaca: the "
                       "classic 'Below is an instruction...' layout + EOS; chatml: <|im_start|> turns")
    group.add_argument("--loss-on", default="assistant", choices=LOSS_ON,
                       help="which tokens are learned: every assistant turn + its end-of-turn token "
                       "(default), only the last assistant turn, or all tokens")
    group.add_argument("--seq-length", type=int, default=None,
                       help=seq_length_help or "maximum tokens per sample; longer samples are "
                       "dropped (or truncated with --truncate) and counted")
    group.add_argument("--truncate", action="store_true",
                       help="keep the first --seq-length tokens of long samples instead of dropping")


def add_format_arguments(group: argparse._ActionsContainer) -> None:
    """``--format`` and the ``--*-field`` custom key names."""
    group.add_argument("--format", default="auto", choices=FORMATS,
                       help="; ".join(f"{f.name}: {f.example}" for f in RECORD_FORMATS.values()))
    for name, what in CUSTOM_FIELDS:
        group.add_argument(f"--{name}-field", help=f"custom key of the {what}")


def render_config(args: argparse.Namespace) -> RenderConfig:
    """The parsed flags as one ``RenderConfig`` (its checks name the flag at fault)."""
    fields = FieldMap(**{name: getattr(args, f"{name}_field") for name, _ in CUSTOM_FIELDS})
    return RenderConfig(prompt_style=args.prompt_style, loss_on=args.loss_on,
                        max_length=args.seq_length, truncate=args.truncate,
                        format=args.format, fields=fields)
