#!/usr/bin/env python3
"""Converter memory and time at DeepSeek-V3's shape, scaled down: the memory must be bounded by
what one output rank file holds, not by the model (671B = 1.3 TB of bf16).

A random DeepseekV3ForCausalLM with the release's structure (multi-latent attention with a q
latent, one dense first layer, routed experts plus a shared expert on every other layer, the
``e_score_correction_bias``, an MTP layer after the decoder, optionally the block-FP8 weights
with ``weight_scale_inv``) is written straight to safetensors (shards of ~2 GiB, as releases
are), then converted to EP8 x PP2 in a child process. Reported:

- peak RSS of the converter (``wait4``'s ``ru_maxrss``) / the largest output rank file, and the
  same minus the idle ``python + torch + megatron.sft`` baseline;
- the converter's wall time / an fsync'd copy of the source bytes (read and write once).

  python benchmarks/bench_convert_deepseek.py [--gib 10] [--fp8] [--workdir /tmp/bench_dsv3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convert import du, run_measured  # noqa: E402

#: DeepSeek-V3's config with the widths scaled down; layers and experts set from --gib
BASE = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280,
    hidden_size=2048, intermediate_size=5632, moe_intermediate_size=512,
    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=768, kv_lora_rank=256,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=1,
    num_experts_per_tok=8, n_group=8, topk_group=4, norm_topk_prob=True,
    routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=163840,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000, hidden_act="silu",
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    num_nextn_predict_layers=1, torch_dtype="bfloat16")
BLOCK = 128
SHARD_BYTES = 2 << 30


def model_config(gib: float, fp8: bool) -> dict:
    cfg = dict(BASE, n_routed_experts=64)
    per_layer = 64 * 3 * 2048 * 512 * (1 if fp8 else 2)  # the routed experts dominate
    cfg["num_hidden_layers"] = max(4, 2 * round(gib * (1 << 30) / per_layer / 2))  # PP2 splits
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                      "activation_scheme": "dynamic",
                                      "weight_block_size": [BLOCK, BLOCK]}
    return cfg


def make_model(out: Path, cfg: dict) -> int:
    """The tensors the table names (and the MTP layer's) with random finite values, FP8 with
    per-block scales where the release quantises; returns the bytes written."""
    import torch

    from megatron.sft.bridge.architectures import get_architecture
    from megatron.sft.bridge.safetensors_io import StreamingShardWriter
    from megatron.sft.bridge.stage_mapping import expected_hf_shapes

    spec = get_architecture("DeepseekV3ForCausalLM")
    shape = spec.shape(cfg)
    shapes = dict(expected_hf_shapes(spec, shape))
    mtp = f"model.layers.{shape.num_layers}."
    h = shape.hidden_size
    shapes.update({mtp + "enorm.weight": (h,), mtp + "hnorm.weight": (h,),
                   mtp + "eh_proj.weight": (h, 2 * h),
                   mtp + "shared_head.norm.weight": (h,)})
    fp8 = "quantization_config" in cfg
    pool = (torch.randn(1 << 26, generator=torch.Generator().manual_seed(0)) * 0.02)
    pool = pool.to(torch.bfloat16)

    def quantised(name, s):
        return fp8 and len(s) == 2 and ".layers." in name and name.endswith("proj.weight")

    entries = []
    for name, s in shapes.items():
        if quantised(name, s):
            entries.append((name, torch.float8_e4m3fn, s))
            entries.append((name + "_scale_inv", torch.float32,
                            tuple(math.ceil(n / BLOCK) for n in s)))
        else:
            entries.append((name, torch.float32 if name.endswith("correction_bias")
                            else torch.bfloat16, s))
    # shards of ~2 GiB, as releases are split
    shards, current, size = [], [], 0
    for e in entries:
        nbytes = math.prod(e[2]) * torch.empty((), dtype=e[1]).element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += nbytes
    shards.append(current)
    out.mkdir(parents=True)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = StreamingShardWriter(out / fname, shard, {"format": "pt"})
        for name, dtype, s in shard:
            n = math.prod(s)
            start = (len(weight_map) * 7919) % (pool.numel() // 2)  # a window of the pool
            if start + n <= pool.numel():
                t = pool[start:start + n].reshape(s)
            else:
                t = pool.repeat(-(-n // pool.numel()))[:n].reshape(s)
            if dtype == torch.float8_e4m3fn:
                t = (t.float() * (448 / 0.1)).clamp(-448, 448)
            elif dtype == torch.float32 and name.endswith("_scale_inv"):
                t = torch.full(s, 0.1 / 448)
            writer.write(name, t.to(dtype))
            weight_map[name] = fname
        writer.close()
        total += writer.nbytes
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


def copy_fsynced(src: Path, dst: Path, pattern: str = "*.safetensors") -> float:
    """Read and write every byte of ``src``'s files once, fsync'd: the reference time."""
    dst.mkdir()
    t0 = time.perf_counter()
    for k, f in enumerate(sorted(src.rglob(pattern))):
        with open(f, "rb") as fi, open(dst / f"{k}_{f.name}", "wb") as fo:
            while block := fi.read(64 << 20):
                fo.write(block)
            fo.flush()
            os.fsync(fo.fileno())
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=10.0, help="source size to aim at (GiB)")
    p.add_argument("--fp8", action="store_true", help="the block-FP8 release format")
    p.add_argument("--ep", type=int, default=8, help="expert-parallel size to convert to")
    p.add_argument("--pp", type=int, default=2, help="pipeline stages to convert to")
    p.add_argument("--workdir", default="/tmp/bench_dsv3",
                   help="where the model and the outputs go (about 3x the source's size)")
    p.add_argument("--keep", action="store_true", help="keep the model and outputs")
    p.add_argument("--make-model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    cfg = model_config(args.gib, args.fp8)
    if args.make_model:  # child: the random tensors stay out of the parent's RSS
        print(make_model(Path(args.make_model), cfg))
        return 0
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    hf, ckpt, copy = work / "hf", work / "megatron", work / "copy"
    py = sys.executable
    t_make, _ = run_measured([py, __file__, "--make-model", str(hf), "--gib", str(args.gib)]
                             + (["--fp8"] if args.fp8 else []))
    source = du(hf)
    ref = copy_fsynced(hf, copy)
    shutil.rmtree(copy)
    wall, rss = run_measured([py, str(REPO / "tools/convert_hf_to_megatron.py"),
                              "--load-dir", str(hf), "--save-dir", str(ckpt),
                              "--target-tensor-parallel-size", "1",
                              "--target-pipeline-parallel-size", str(args.pp),
                              "--target-expert-model-parallel-size", str(args.ep),
                              "--no-progress"])
    _, idle = run_measured([py, "-c", "import torch, megatron.sft.bridge.convert"])
    out_ref = copy_fsynced(ckpt, copy, "*.pt")  # the bytes the converter wrote, copied once
    shutil.rmtree(copy)
    files = sorted(ckpt.rglob("model_optim_rng.pt"))
    largest = max(f.stat().st_size for f in files)
    gib = 1 << 30
    print(f"model: DeepSeek-V3-shaped, {cfg['num_hidden_layers']} layers (+1 MTP), "
          f"{cfg['n_routed_experts']} experts, {'block-FP8' if args.fp8 else 'bf16'}; source "
          f"{source / gib:.2f} GiB in {len(list(hf.glob('*.safetensors')))} shards (made in "
          f"{t_make:.0f} s); converted to TP1 PP{args.pp} EP{args.ep}: {len(files)} rank "
          f"files, {du(ckpt) / gib:.2f} GiB, largest {largest / gib:.3f} GiB; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"peak RSS {rss / gib:.3f} GiB = {rss / largest:.2f}x the largest rank file "
          f"(idle python+torch baseline {idle / gib:.3f} GiB; above it: "
          f"{(rss - idle) / largest:.2f}x); goal <= largest file + 2 GiB: "
          f"{'OK' if rss <= largest + 2 * gib else 'OVER'}")
    print(f"wall {wall:.1f} s = {wall / out_ref:.2f}x an fsync'd copy of the bytes it wrote "
          f"({out_ref:.1f} s); {wall / ref:.2f}x an fsync'd copy of the source bytes "
          f"({ref:.1f} s)")
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
