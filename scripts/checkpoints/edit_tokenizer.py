#!/usr/bin/env python3
"""Rename added/special tokens and replace the chat template of a Hugging Face tokenizer folder.

  # the original usage: reserved <|quad_start|> (id 151650) -> non-special control token <short>,
  # plus the hybrid-reasoning chat template, written to a new folder
  python scripts/checkpoints/edit_tokenizer.py \\
      --tokenizer-model assets/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B \\
      --rename '<|quad_start|>=<short>:non-special' \\
      --chat-template my_template.jinja \\
      --output-dir assets/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B_short

  # the same by id, editing the folder itself
  python scripts/checkpoints/edit_tokenizer.py --tokenizer-model DIR \\
      --rename-id '151650=<short>:non-special' --in-place

Rename syntax (both flags repeatable):
  --rename OLD=NEW[:special|:non-special]   pick the token by its current content (split at the
                                            first '='; use --rename-id for names containing '=')
  --rename-id ID=NEW[:special|:non-special] pick the token by id
  The suffix sets the token's special flag (special tokens are dropped by
  decode(skip_special_tokens=True)); without it the token keeps its current flag. NEW may equal
  the old name to change only the flag: --rename '<x>=<x>:non-special'.

Each change is applied everywhere the name lives: tokenizer.json (added_tokens, model.vocab,
post_processor), tokenizer_config.json (added_tokens_decoder, bos/eos/pad/... tokens,
additional_special_tokens), special_tokens_map.json and added_tokens.json when present.
--chat-template FILE replaces the template in chat_template.jinja and/or tokenizer_config.json,
wherever the folder keeps it.

Bad input (unknown id or name, a name already taken, nothing to change) is refused with exit code
2 before anything is written. The edited tokenizer is loaded with transformers.AutoTokenizer and
checked (each renamed token maps to its id both ways, encodes as one token inside text, and is
kept or dropped by skip_special_tokens as its flag says); if that fails, exit code 1 and nothing
is written. Writes are atomic: --output-dir is built in a temp folder and renamed into place,
--in-place replaces files through temp files and os.replace.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megatron.sft.data.tokenizer_edit import (  # noqa: E402
    TokenizerEditError,
    VerificationError,
    parse_rename,
    parse_rename_id,
)
from megatron.sft.data.tokenizer_edit_io import edit_tokenizer_dir  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-model", required=True, metavar="DIR",
                   help="Hugging Face tokenizer or model folder (must hold tokenizer.json)")
    p.add_argument("--rename", action="append", default=[],
                   metavar="OLD=NEW[:special|:non-special]",
                   help="rename the added token whose content is OLD (repeatable)")
    p.add_argument("--rename-id", action="append", default=[],
                   metavar="ID=NEW[:special|:non-special]",
                   help="rename the added token with this id (repeatable)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="replace the chat template with the contents of this Jinja file")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--output-dir", metavar="DIR",
                       help="write the edited folder here (all other files copied); must not "
                            "exist or be empty")
    where.add_argument("--in-place", action="store_true",
                       help="edit the --tokenizer-model folder itself")
    p.add_argument("--dry-run", action="store_true",
                   help="check and verify the edits, print the summary, write nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        requests = ([parse_rename(s) for s in args.rename]
                    + [parse_rename_id(s) for s in args.rename_id])
        template = None
        if args.chat_template is not None:
            path = Path(args.chat_template)
            if not path.is_file():
                raise TokenizerEditError("--chat-template file not found", str(path),
                                         "Pass the path of a Jinja template file.")
            template = path.read_text(encoding="utf-8")
        result = edit_tokenizer_dir(args.tokenizer_model, requests, template,
                                    output_dir=args.output_dir, in_place=args.in_place,
                                    dry_run=args.dry_run)
    except TokenizerEditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except VerificationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(result.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
