#!/usr/bin/env python3
"""Download a HuggingFace model (safetensors weights, config, tokenizer) into assets/checkpoints.

  python scripts/checkpoints/download_hf_models.py --model-card deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
  -> assets/checkpoints/deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B/

--model-card may also be a local HF directory (e.g. copied from another machine); it is then
copied into place the same way. Downloads go to a ``.partial`` directory that is renamed when
complete, and a re-run resumes it. Gated models need HF_TOKEN (or --token).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

#: what a Megatron-SFT run needs; PyTorch pickles (*.bin) and remote code (*.py) are never fetched
ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model",
                  "*.tiktoken", "*.jinja"]


def local_name(model_card: str) -> str:
    """``deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B`` -> ``deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B``"""
    return re.sub(r"[-/]", "_", model_card.strip("/"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-card", required=True, help="ORG/NAME on the Hub, or a local directory")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--output-dir", default=None,
                   help="default: $ASSETS_DIR/checkpoints/ORG_NAME (ASSETS_DIR defaults to assets/)")
    p.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    return p.parse_args(argv)


def check_model_dir(path: Path) -> str:
    """One line describing the model, or a warning when the bridge cannot convert it."""
    import json

    cfg = json.loads((path / "config.json").read_text())
    arch = (cfg.get("architectures") or ["?"])[0]
    if not list(path.glob("*.safetensors")):
        return f"warning: {path} has no safetensors weights; the converter needs them"
    try:
        from megatron.sft.bridge.architectures import supported_architectures
    except ModuleNotFoundError as e:  # a user account with only requirements.txt: no torch
        if e.name != "torch":
            raise
        return f"{arch} (not checked against the converter here: torch is not installed)"
    if arch not in supported_architectures():
        return (f"warning: {arch} is not supported by the converter "
                f"(supported: {', '.join(supported_architectures())})")
    return f"{arch}, ready for scripts/checkpoints/convert_hf_to_megatron.sh"


def main(argv=None) -> int:
    args = parse_args(argv)
    assets = Path(os.environ.get("ASSETS_DIR", REPO / "assets"))
    source = Path(args.model_card).expanduser()
    is_local = source.is_dir()
    name = local_name(source.name if is_local else args.model_card)
    out = Path(args.output_dir) if args.output_dir else assets / "checkpoints" / name
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: {out} already exists; pass --force to replace it", file=sys.stderr)
        return 2
    partial = out.with_name(out.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)

    if is_local:
        if not (source / "config.json").exists():
            print(f"error: {source} has no config.json; not a HuggingFace model directory",
                  file=sys.stderr)
            return 2
        if partial.exists():
            shutil.rmtree(partial)
        shutil.copytree(source, partial, ignore=shutil.ignore_patterns("*.bin", ".git*"))
    else:
        if "/" not in args.model_card:
            print(f"error: --model-card {args.model_card!r} is neither ORG/NAME nor an existing "
                  "directory", file=sys.stderr)
            return 2
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(repo_id=args.model_card, revision=args.revision,
                              local_dir=str(partial), allow_patterns=ALLOW_PATTERNS,
                              token=args.token or os.environ.get("HF_TOKEN"))
        except KeyboardInterrupt:
            print(f"interrupted; re-run to resume (partial files kept in {partial})",
                  file=sys.stderr)
            return 130
        except Exception as e:  # the hub client raises many types for "offline"/"not found"
            print(f"error: could not download {args.model_card} from the Hugging Face Hub "
                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).\n"
                  "  Offline? Copy the model directory here and pass its path as --model-card. "
                  "Gated model? Set HF_TOKEN.", file=sys.stderr)
            return 1
        shutil.rmtree(partial / ".cache", ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    print(f"saved {out}: {check_model_dir(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
