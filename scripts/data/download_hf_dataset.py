#!/usr/bin/env python
# The next line lets the original usage `bash scripts/data/download_hf_dataset.py ...` work: bash
# runs it as `exec python this-file args`; Python sees a harmless string literal.
''''exec "${PYTHON:-python}" "$0" "$@" # '''
from __future__ import annotations

DESCRIPTION = """Download a Hugging Face Hub dataset split and save it as JSON lines for pre-tokenisation.

Usage:
  python scripts/data/download_hf_dataset.py --dataset-card ORG/NAME [--split train]

Creates assets/data/ORG-NAME/ORG-NAME.json (one JSON object per line), the layout
scripts/data/tokenize_dataset.sh expects. The file is written under a temporary name and renamed
when complete. Needs network access to the Hub (or HF_ENDPOINT); offline, it exits with an error
that says where to put a manually copied file instead.
"""

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def output_path(dataset_card: str, output_dir: str | Path) -> Path:
    """``Vinnnf/Hybrid-X`` -> ``<output_dir>/Vinnnf-Hybrid-X/Vinnnf-Hybrid-X.json``."""
    parts = dataset_card.strip("/").split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(
            f"--dataset-card {dataset_card!r} must look like ORG/NAME, e.g. Vinnnf/Hybrid-OpenThoughts2-1M-1.5B."
        )
    name = "-".join(parts)
    return Path(output_dir) / name / f"{name}.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-card", required=True, help="Hub dataset id, ORG/NAME")
    p.add_argument("--split", default="train", help="split to download (default: train)")
    p.add_argument("--subset", default=None, help="dataset configuration name, if it has several")
    p.add_argument("--output-dir", default=str(REPO_ROOT / "assets" / "data"),
                   help="root folder (default: assets/data)")
    p.add_argument("--cache-dir", default=str(REPO_ROOT / "assets" / "cache"),
                   help="HF datasets cache (default: assets/cache)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        target = output_path(args.dataset_card, args.output_dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        import datasets
    except ImportError:
        print("error: the 'datasets' package is missing; run `pip install -r requirements.txt`.",
              file=sys.stderr)
        return 1
    try:
        ds = datasets.load_dataset(args.dataset_card, args.subset, split=args.split,
                                   cache_dir=args.cache_dir)
    except Exception as exc:  # connection, offline mode, missing repo, bad split: all user-facing
        print(
            f"error: could not download {args.dataset_card!r} split {args.split!r} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).\n"
            "  Check network access to huggingface.co (or HF_ENDPOINT; HF_HUB_OFFLINE must be unset),\n"
            "  the dataset name and split, and HF_TOKEN for gated datasets.\n"
            f"  Offline: copy the data as JSON lines to {target} and continue with tokenize_dataset.sh.",
            file=sys.stderr,
        )
        return 1
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    try:
        ds.to_json(str(tmp), lines=True, force_ascii=False)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    print(f"saved {len(ds)} records to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
