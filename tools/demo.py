#!/usr/bin/env python3
"""The built-in tiny end-to-end job (CPU, offline): what `make demo` runs.

Stages so far: make a tiny random Qwen2-shaped HF model -> convert to Megatron TP=2 -> build the
megatron-core model on 2 gloo ranks and compare its logits with transformers -> export back to
HF -> check every tensor and the config are bit-identical. Prints a per-stage summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(REPO / "runs" / "demo"),
                   help="where models and checkpoints go (default: runs/demo; replaced each run)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=2)
    return p.parse_args(argv)


class Stages:
    def __init__(self):
        self.rows: list[tuple[str, float, str]] = []

    def run(self, name, fn):
        print(f"==> {name}", flush=True)
        t0 = time.perf_counter()
        detail = fn() or ""
        self.rows.append((name, time.perf_counter() - t0, detail))
        return detail

    def summary(self) -> str:
        width = max(len(r[0]) for r in self.rows)
        lines = [f"  {n:<{width}}  {t:7.1f}s  {d}" for n, t, d in self.rows]
        return "\n".join(["Summary:"] + lines + [f"  {'total':<{width}}  "
                                                 f"{sum(r[1] for r in self.rows):7.1f}s"])


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    tp = args.tensor_model_parallel_size
    hf_dir, ckpt, export = work / "hf_tiny_qwen2", work / f"megatron_TP{tp}PP1", work / "export"
    stages = Stages()

    def make_model():
        from megatron.sft.bridge.random_hf_model import make_random_hf_model

        make_random_hf_model("Qwen2ForCausalLM", hf_dir, seed=0)
        cfg = json.loads((hf_dir / "config.json").read_text())
        return f"{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}"

    def convert():
        from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
        from megatron.sft.bridge.layout import ParallelLayout

        meta = convert_hf_to_megatron(hf_dir, ckpt, ConvertOptions(layout=ParallelLayout(tp, 1),
                                                                   progress=False))
        return f"TP{tp}: {len(list(ckpt.rglob('model_optim_rng.pt')))} rank files, vocab padded to {meta.padded_vocab_size}"

    def parity():
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        out = work / "parity.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp),
               "--standalone", str(REPO / "tools" / "check_hf_parity.py"),
               "--load", str(ckpt), "--hf-model", str(hf_dir), "--output-json", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit("parity check failed")
        diff = json.loads(out.read_text())["max_abs_diff"]
        return f"megatron-core on {tp} gloo ranks vs transformers: max |dlogits| = {diff:.2e}"

    def export_back():
        from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf

        export_megatron_to_hf(ckpt, export, hf_dir, ExportOptions(progress=False))
        return str(export)

    def compare():
        import torch
        from safetensors.torch import load_file

        a, b = load_file(hf_dir / "model.safetensors"), load_file(export / "model.safetensors")
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        same_cfg = json.loads((hf_dir / "config.json").read_text()) == \
            json.loads((export / "config.json").read_text())
        if not (same and same_cfg):
            raise SystemExit("round trip changed the model")
        return f"{len(a)} tensors and config.json bit-identical"

    stages.run("make tiny HF model", make_model)
    stages.run("convert HF -> Megatron", convert)
    stages.run("logits parity", parity)
    stages.run("export Megatron -> HF", export_back)
    stages.run("round-trip check", compare)
    print(stages.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
