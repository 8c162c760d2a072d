#!/usr/bin/env python3
"""Plot a training run's loss (and validation loss) and learning rate from its --log-json file.

  python tools/plot_training_log.py assets/checkpoints/SFT_run/train_log.jsonl loss.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.sft.cli import run_cli  # noqa: E402


def read_log(path: str) -> list[dict]:
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not a JSON line") from None
    if not records:
        raise ValueError(f"{path} holds no log records")
    # A resumed run appends; keep the last record of each iteration.
    by_iter = {r["iteration"]: r for r in records}
    return [by_iter[i] for i in sorted(by_iter)]


def plot(records: list[dict], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    ax_loss.plot(its, [r["loss"] for r in records], label="train loss", linewidth=1.2)
    valid = [(r["iteration"], r["valid_loss"]) for r in records if "valid_loss" in r]
    if valid:
        ax_loss.plot(*zip(*valid), "o-", label="validation loss")
    ax_loss.set_ylabel("loss (per assistant token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_loss.set_title(title)
    ax_lr.plot(its, [r["lr"] for r in records], color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="JSON-lines file written by tools/train_sft.py --log-json")
    p.add_argument("output", help="PNG to write")
    p.add_argument("--title", default="Megatron-SFT training", help="title above the plots")
    args = p.parse_args(argv)
    records = read_log(args.log)
    plot(records, args.output, args.title)
    print(f"wrote {args.output} ({len(records)} iterations, loss {records[0]['loss']:.3f} -> "
          f"{records[-1]['loss']:.3f})")
    return 0


if __name__ == "__main__":
    run_cli(main)
