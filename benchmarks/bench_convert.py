#!/usr/bin/env python3
"""Benchmark HF -> Megatron conversion and Megatron -> HF export on a ~0.5B Qwen2-shaped model
(or, with ``--moe``, a ~0.6B Qwen3-MoE-shaped one: 16 experts on each of 12 layers).

Measures wall time, peak RSS (each step in its own process, read from wait4) and bytes on
disk, against two references: the model's own byte size (goal: peak RSS <= 1.5x) and the time
to read and write those bytes once with plain file I/O (goal: wall time <= 2x). With
``--repeats N`` the copy, convert and export alternate N times and the medians count.

  python benchmarks/bench_convert.py [--workdir /tmp/bench_convert] [--dtype bf16] [--tp 1 --pp 1]
  python benchmarks/bench_convert.py --hf-config r1_distill_qwen_1.5b_config.json --tp 2 --repeats 3
  python benchmarks/bench_convert.py --moe --ep 4 [--fused]   # experts split over 4 EP ranks

The random model is written straight to safetensors from the architecture's shapes (making it
through transformers would itself take several GB); conversion coverage checks prove it has
exactly the tensors transformers would create.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


#: ~0.6B parameters, Qwen3-MoE-shaped: routed experts are 85% of the non-embedding bytes
QWEN3_MOE_0_6B_CONFIG = dict(
    vocab_size=151936, hidden_size=768, intermediate_size=2048, moe_intermediate_size=768,
    num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, num_hidden_layers=12,
    num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=32768,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=1000000.0)


def make_moe_model(out: Path, dtype_name: str, fused: bool) -> int:
    """The MoE model from the table's own names and shapes (per expert, or fused)."""
    import torch

    from megatron.sft.bridge.architectures import get_architecture
    from megatron.sft.bridge.safetensors_io import StreamingShardWriter
    from megatron.sft.bridge.stage_mapping import expected_hf_shapes

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    cfg = dict(QWEN3_MOE_0_6B_CONFIG, architectures=["Qwen3MoeForCausalLM"],
               model_type="qwen3_moe", hidden_act="silu",
               torch_dtype=str(dtype).replace("torch.", ""))
    spec = get_architecture("Qwen3MoeForCausalLM")
    shape = spec.shape(cfg)
    shapes = expected_hf_shapes(spec, shape)
    if fused:  # [E, rows, cols] per layer and kind, as transformers 5 holds them
        for layer in shape.moe.layers:
            for f in spec.fused_experts.tensors:
                parts = [[p.format(i=layer, e=e) for p in f.parts]
                         for e in range(shape.moe.num_experts)]
                rows = sum(shapes[p][0] for p in parts[0])
                cols = shapes[parts[0][0]][1]
                for names in parts:
                    for n in names:
                        del shapes[n]
                shapes[f.fused.format(i=layer)] = (shape.moe.num_experts, rows, cols)
    out.mkdir(parents=True)
    writer = StreamingShardWriter(out / "model.safetensors",
                                  [(n, dtype, s) for n, s in shapes.items()])
    gen = torch.Generator().manual_seed(0)
    for n, s in shapes.items():
        writer.write(n, (torch.randn(s, generator=gen) * 0.02).to(dtype))
    writer.close()
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return writer.nbytes


def make_model(out: Path, dtype_name: str, hf_config: str | None = None) -> int:
    """A random Qwen2 model: the 0.5B shape, or the shape of ``hf_config`` (a ``config.json``)."""
    import torch

    from megatron.sft.bridge.architectures import get_architecture
    from megatron.sft.bridge.random_hf_model import QWEN2_0_5B_CONFIG
    from megatron.sft.bridge.safetensors_io import StreamingShardWriter
    from megatron.sft.bridge.stage_mapping import required_hf_names

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    base = json.loads(Path(hf_config).read_text()) if hf_config else QWEN2_0_5B_CONFIG
    cfg = dict(base, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
               hidden_act="silu", torch_dtype=str(dtype).replace("torch.", ""))
    spec = get_architecture("Qwen2ForCausalLM")
    shape = spec.shape(cfg)
    h, f, d = shape.hidden_size, shape.ffn_hidden_size, shape.head_dim
    q, kv = shape.num_attention_heads * d, shape.num_query_groups * d
    shapes = {"embed_tokens": (shape.vocab_size, h), "q_proj.weight": (q, h),
              "k_proj.weight": (kv, h), "v_proj.weight": (kv, h), "q_proj.bias": (q,),
              "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj": (h, q), "gate_proj": (f, h),
              "up_proj": (f, h), "down_proj": (h, f), "norm": (h,), "lm_head": (shape.vocab_size, h)}

    def shape_of(name):
        for key, s in shapes.items():
            if key in name:
                return s
        raise KeyError(name)

    names = required_hf_names(spec, shape)
    out.mkdir(parents=True)
    writer = StreamingShardWriter(out / "model.safetensors",
                                  [(n, dtype, shape_of(n)) for n in names])
    gen = torch.Generator().manual_seed(0)
    for n in names:
        writer.write(n, (torch.randn(shape_of(n), generator=gen) * 0.02).to(dtype))
    writer.close()
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return writer.nbytes


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss * 1024


def copy_once(src: Path, dst: Path) -> float:
    """Read every byte into memory in 64 MiB blocks and write it out, fsync'd (the reference)."""
    t0 = time.perf_counter()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(64 << 20):
            fo.write(block)
        fo.flush()
        os.fsync(fo.fileno())
    return time.perf_counter() - t0


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/bench_convert",
                   help="where the random model and the outputs go (default: /tmp/bench_convert)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="dtype of the random model's weights (default: bf16)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to convert to")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages to convert to")
    p.add_argument("--moe", action="store_true",
                   help="a Qwen3-MoE-shaped model (16 experts x 12 layers) instead of Qwen2")
    p.add_argument("--ep", type=int, default=1, help="--moe: expert-parallel size to convert to")
    p.add_argument("--fused", action="store_true",
                   help="--moe: the HF experts fused ([E, 2F, D] per layer) instead of one "
                        "tensor per expert")
    p.add_argument("--hf-config", default=None,
                   help="config.json of a Qwen2-architecture model whose shape to use instead of "
                        "0.5B (e.g. R1-Distill-Qwen-1.5B's)")
    p.add_argument("--repeats", type=int, default=1,
                   help="alternating runs of copy, convert, copy, export; medians reported")
    p.add_argument("--hf-dir", default=None,
                   help="use this HF model folder (e.g. one an earlier run made) instead of "
                        "making a random one")
    p.add_argument("--make-model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make_model:  # child mode: keeps the big random tensors out of the parent's RSS
        print(make_moe_model(Path(args.make_model), args.dtype, args.fused) if args.moe
              else make_model(Path(args.make_model), args.dtype, args.hf_config))
        return 0
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    hf, ckpt, export = work / "hf", work / "megatron", work / "export"

    # Everything heavy runs in child processes: Linux carries a parent's peak RSS into a forked
    # child's ru_maxrss, so the parent must stay small for the readings to mean anything.
    if args.hf_dir:  # a model made by an earlier run (the outputs still go to --workdir)
        hf = Path(args.hf_dir)
    else:
        run_measured([sys.executable, __file__, "--make-model", str(hf), "--dtype", args.dtype]
                     + (["--moe"] if args.moe else []) + (["--fused"] if args.fused else [])
                     + (["--hf-config", args.hf_config] if args.hf_config else []))
    model_bytes = (hf / "model.safetensors").stat().st_size
    copy = work / "copy.bin"
    py = sys.executable
    convert_cmd = [py, str(REPO / "tools/convert_hf_to_megatron.py"),
                   "--load-dir", str(hf), "--save-dir", str(ckpt),
                   "--target-tensor-parallel-size", str(args.tp),
                   "--target-pipeline-parallel-size", str(args.pp),
                   "--target-expert-model-parallel-size", str(args.ep), "--no-progress"]
    export_cmd = [py, str(REPO / "tools/export_megatron_to_hf.py"), "--load-dir", str(ckpt),
                  "--save-dir", str(export), "--hf-reference", str(hf), "--no-progress"]
    # Alternating copy, convert, copy, export, --repeats times: a burst of load from another
    # process lands on one run of one arm, and the medians leave it out.
    refs, conv, exp = [], [], []
    for _ in range(args.repeats):
        for out in (ckpt, export):
            shutil.rmtree(out, ignore_errors=True)
        refs.append(copy_once(hf / "model.safetensors", copy))
        copy.unlink()
        conv.append(run_measured(convert_cmd))
        refs.append(copy_once(hf / "model.safetensors", copy))
        copy.unlink()
        exp.append(run_measured(export_cmd))
    ref_time = statistics.median(refs)
    conv_t, conv_rss = statistics.median(t for t, _ in conv), max(r for _, r in conv)
    exp_t, exp_rss = statistics.median(t for t, _ in exp), max(r for _, r in exp)
    _, idle_rss = run_measured([py, "-c", "import torch, megatron.sft.bridge.convert"])
    gib = 1 << 30
    kind = (f"Qwen3-MoE-0.6B-shaped ({'fused' if args.fused else 'per-expert'} experts)"
            if args.moe else f"Qwen2-shaped ({Path(args.hf_config).name})" if args.hf_config
            else "Qwen2-0.5B-shaped")
    print(f"model: {kind}, {args.dtype}, {model_bytes / gib:.3f} GiB of tensors; "
          f"layout TP{args.tp} PP{args.pp}" + (f" EP{args.ep}" if args.ep > 1 else "")
          + f"; {os.cpu_count()} CPUs")
    print(f"runs: {args.repeats} of each, alternating; medians. copy "
          f"[{', '.join(f'{t:.1f}' for t in refs)}] s, convert [{', '.join(f'{t:.1f}' for t, _ in conv)}] s, "
          f"export [{', '.join(f'{t:.1f}' for t, _ in exp)}] s; load average {os.getloadavg()[0]:.1f}")
    print(f"reference: read+write the bytes once = {ref_time:.2f} s; "
          f"python+torch import baseline RSS = {idle_rss / gib:.3f} GiB")
    for name, t, rss, out in (("convert", conv_t, conv_rss, ckpt), ("export", exp_t, exp_rss, export)):
        print(f"{name:8s} wall {t:6.2f} s ({t / ref_time:.2f}x ref, goal <= 2x) | peak RSS "
              f"{rss / gib:.3f} GiB ({rss / model_bytes:.2f}x model, goal <= 1.5x) | on disk "
              f"{du(out) / gib:.3f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
