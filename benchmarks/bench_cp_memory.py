#!/usr/bin/env python3
"""What context parallelism saves: activation memory per rank for one long packed row at CP1,
CP2 and CP4 (a tiny random Qwen2-shaped model, fp32, gloo ranks on the CPU, sdpa attention).

  python benchmarks/bench_cp_memory.py [--seq-length 16384 --hidden 256 --layers 4 --cp 1,2,4]

Per rank, one forward + backward of a masked cross-entropy through megatron-core's schedule:

- *activations*: bytes of every tensor autograd saves for backward during the forward (storages
  counted once; ``torch.autograd.graph.saved_tensors_hooks``): what the forward leaves for
  backward, the memory CP divides;
- *step peak*: the process's peak resident set during forward + backward minus the resident set
  before (Linux VmHWM after resetting it), which adds the transients (the all-gathered K/V,
  attention scratch, the logits) and the allocator's slack.

Both are the maximum over the CP ranks; each CP size runs in its own ``torchrun``. The row holds
four documents (6000, 5000, 3000 and the rest), so ranks hold pieces of several documents.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # bench_assets, when imported as a module



from bench_assets import proc_status_bytes  # noqa: E402


def make_checkpoint(root: Path, args) -> Path:
    from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
    from megatron.sft.bridge.random_hf_model import make_random_hf_model
    from megatron.sft.runtime.layout import ParallelLayout

    hf = make_random_hf_model("Qwen2ForCausalLM", root / "hf", seed=0, overrides=dict(
        hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
        max_position_embeddings=args.seq_length))
    out = root / "mg"
    convert_hf_to_megatron(hf, out, ConvertOptions(layout=ParallelLayout(), progress=False))
    return out


def measure(ckpt: str, args) -> None:
    """One CP size, inside torchrun: rank 0 prints the JSON line."""
    import torch
    import torch.distributed as dist

    from megatron.sft.runtime.distributed import destroy_distributed, initialize_distributed
    from megatron.sft.runtime.layout import ParallelLayout

    cp = int(os.environ["WORLD_SIZE"])
    info = initialize_distributed(ParallelLayout(cp=cp))
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron.sft.bridge.architectures import shape_of
    from megatron.sft.bridge.checkpoint_io import iteration_dir, read_metadata
    from megatron.sft.model.layer_impl import LayerImpl
    from megatron.sft.training.batch import local_micro_batch, masked_loss_sum
    from megatron.sft.training.loss import vocab_parallel_token_loss
    from megatron.sft.model.builder import build_model_from_checkpoint

    s = args.seq_length
    vocab = shape_of(read_metadata(iteration_dir(ckpt)).hf_config)[1].vocab_size
    impl = LayerImpl("local", "sdpa")
    chunks, _, _ = build_model_from_checkpoint(ckpt, impl=impl, seq_length=s,
                                               calculate_per_token_loss=True)
    gen = torch.Generator().manual_seed(0)
    lengths = [6000, 5000, 3000]
    bounds = [0]
    for n in lengths:
        bounds.append(min(s, bounds[-1] + n))
    bounds.append(s)
    cu = torch.tensor([sorted(set(bounds))], dtype=torch.int32)
    positions = torch.cat([torch.arange(b - a) for a, b in zip(cu[0, :-1].tolist(),
                                                               cu[0, 1:].tolist())]).view(1, s)
    batch = {"tokens": torch.randint(0, vocab, (1, s), generator=gen),
             "labels": torch.randint(0, vocab, (1, s), generator=gen),
             "loss_mask": torch.ones(1, s), "position_ids": positions}
    attention = impl.attention_inputs(cu, 1, s, None, cp_size=cp, cp_rank=info.dims.cp_rank)
    batch = local_micro_batch(batch, attention.local_index)
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    def forward_step(data_iterator, model):
        next(data_iterator)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = model(batch["tokens"], batch["position_ids"], attention_mask=None,
                           packed_seq_params=attention.packed_seq_params)

        def loss_func(out):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, count = masked_loss_sum(vocab_parallel_token_loss(out, batch["labels"],
                                                                        vocab),
                                              batch["loss_mask"])
            return loss, count, {}

        return output, loss_func

    chunks[0].train()
    weights = {p.untyped_storage().data_ptr() for p in chunks[0].parameters()}
    before = proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([0]),
                                model=chunks[0], num_microbatches=1, seq_length=s,
                                micro_batch_size=1, forward_only=False)
    peak = proc_status_bytes("VmHWM") - before
    activations = sum(n for ptr, n in saved.items() if ptr not in weights)
    stats = torch.tensor([activations, peak], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(json.dumps({"cp": cp, "tokens_per_rank": s // cp, "activations": stats[0].item(),
                          "step_peak": stats[1].item()}), flush=True)
    destroy_distributed(wait_for_peers=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-length", type=int, default=16384, help="tokens in the one row")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the model")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the model")
    p.add_argument("--cp", default="1,2,4", help="comma-separated context parallel sizes")
    p.add_argument("--measure", metavar="CKPT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure(args.measure, args)
        return 0
    ckpt = make_checkpoint(Path(tempfile.mkdtemp(prefix="bench_cp_")), args)
    rows = []
    for cp in (int(x) for x in args.cp.split(",")):
        # one torchrun per size: a size's freed memory never hides another's peak
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(cp), __file__, *sys.argv[1:], "--measure", str(ckpt)]
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=str(REPO))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.stderr.write(out.stderr[-4000:])
            return out.returncode
        rows.append(json.loads([line for line in out.stdout.splitlines()
                                if line.startswith("{")][-1]))
    base = rows[0]
    print(f"one row of {args.seq_length} tokens, Qwen2-shaped hidden {args.hidden}, "
          f"{args.layers} layers, 8 heads / 2 KV heads, fp32, sdpa, gloo on CPU")
    print("| CP | tokens per rank | activations per rank | vs CP1 | step peak per rank | vs CP1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['cp']} | {r['tokens_per_rank']} | {r['activations'] / 2**20:.0f} MiB | "
              f"{r['activations'] / base['activations']:.2f}x | {r['step_peak'] / 2**20:.0f} MiB "
              f"| {r['step_peak'] / base['step_peak']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
