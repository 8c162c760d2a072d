"""torchrun worker for the Mixture-of-Experts proofs: every logits-parity case and every
training run in one 4-rank launch (starting processes is what costs on a 2-core machine).

``moe_worker.py SPEC.json``; SPEC has ``out`` (JSON that rank 0 writes) and

- ``parity``: cases ``{name, ckpt, hf, experts}`` (``experts``: ``grouped_mm`` |
  ``sequential``), plus for negative controls ``overrides`` (``TransformerConfig`` fields) or
  ``zero`` (parameters whose name contains it are zeroed). Result per case:
  ``{max_abs_diff, ref_abs_max, layout}`` of megatron-core's logits against transformers'.
- ``runs``: ``{name: TrainConfig fields}``, trained in order; a run's ``rewind_to: N`` first
  points its ``--load`` tracker back at iteration N (as a user rolls back), its
  ``reshard_from: [RUN, N, EP]`` first reshards iteration N of RUN to EP into its ``--load``. Result: the history.
  With ``hf``, rank 0 also writes the references of global batch 0 after the first run whose
  name starts with ``aux``: ``hf_loss`` (transformers' masked loss, each packed sample on its
  own) and ``hand_aux`` (megatron-core's load-balancing formula by hand from transformers'
  router logits of the same tokens, per MoE layer, averaged over micro-batches and DP ranks).
  A run's ``probe_clip: MAX`` first measures the gradient norm and clipping of global batch 0
  (``clip_probe``; result ``NAME/clip``).

Between cases of different layouts the model-parallel state is rebuilt on the same process
group.
"""

import gc
import json
import os
import sys
from itertools import groupby
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))


def use_layout(layout) -> None:
    from megatron.sft.runtime.distributed import initialize_distributed, release_model_parallel

    release_model_parallel()  # closes the gloo groups and forgets the parallel dims too
    if layout is not None:
        initialize_distributed(layout)


# ------------------------------------------------------------------------------ parity
def run_parity(cases) -> dict:
    import torch
    import torch.distributed as dist

    from megatron.sft.bridge.checkpoint_io import iteration_dir, read_metadata
    from megatron.sft.model.layer_impl import LayerImpl
    from megatron.sft.runtime.parallel_dims import parallel_dims
    from megatron.sft.training.forward_logits import pipeline_logits
    from megatron.sft.model.builder import build_model_from_checkpoint

    layout_of = {c["ckpt"]: read_metadata(iteration_dir(c["ckpt"])).layout for c in cases}
    results, references = {}, {}
    for layout, group in groupby(cases, key=lambda c: layout_of[c["ckpt"]]):
        use_layout(layout)
        for case in group:
            impl = LayerImpl("local", "sdpa", case["experts"])
            chunks, meta, _ = build_model_from_checkpoint(case["ckpt"], impl=impl, seq_length=24,
                                                          **case.get("overrides", {}))
            with torch.no_grad():
                for model in chunks:
                    for pname, param in model.named_parameters():
                        if case.get("zero") and case["zero"] in pname:
                            param.zero_()
            vocab = meta.hf_config["vocab_size"]
            tokens = torch.randint(0, vocab, (4, 24), generator=torch.Generator().manual_seed(7))
            logits = pipeline_logits(chunks, tokens, vocab,
                                     num_microbatches=layout.pp if layout.vpp else 2)
            dims = parallel_dims()
            mine = logits if logits is not None and dims.tp_rank == 0 and dims.dp_rank == 0 \
                else None
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            if dist.get_rank() == 0:
                got = next(g for g in gathered if g is not None)
                if case["hf"] not in references:
                    from transformers import AutoModelForCausalLM

                    hf = AutoModelForCausalLM.from_pretrained(case["hf"], dtype=torch.float32,
                                                              attn_implementation="eager")
                    with torch.no_grad():
                        references[case["hf"]] = hf(tokens).logits
                ref = references[case["hf"]]
                results[case["name"]] = {"max_abs_diff": (got - ref).abs().max().item(),
                                         "ref_abs_max": ref.abs().max().item(),
                                         "layout": layout.describe()}
            del chunks
    return results


# ------------------------------------------------------------------------------ training
def hand_aux_loss(router_logits, top_k: int) -> float:
    """megatron-core's ``switch_load_balancing_loss_func`` for one micro-batch of ``T`` real
    tokens, written out: ``E / (k T^2) * sum_e (sum_t p_te) * N_e``, ``p = softmax(logits)``,
    ``N_e`` the tokens whose top-k holds ``e``."""
    import torch

    probs = torch.softmax(router_logits.double(), dim=-1)
    t, e = probs.shape
    chosen = torch.zeros_like(probs).scatter(1, probs.topk(top_k, dim=-1).indices, 1.0)
    return float((probs.sum(0) * chosen.sum(0)).sum() * e / (top_k * t * t))


def references(hf_dir, dataset, cfg, dp_size, moe_layers, top_k):
    """``(hf_loss, tokens, {layer: hand aux})`` of global batch 0 (``dp_size`` DP ranks)."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron.sft.training.batch import microbatch_rows, valid_cu_seqlens
    from train_worker import masked_hf_loss

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    loss_sum, count = masked_hf_loss(model, dataset, range(cfg["global_batch_size"]))
    aux = {layer: [] for layer in moe_layers}
    with torch.no_grad():
        for dp_rank in range(dp_size):
            for micro in microbatch_rows(0, cfg["global_batch_size"], cfg["micro_batch_size"],
                                         dp_rank, dp_size):
                per_layer = {layer: [] for layer in moe_layers}
                for r in micro:
                    item = dataset[r]
                    cu = valid_cu_seqlens(item["cu_seqlens"]).tolist()
                    for start, end in zip(cu[:-1], cu[1:]):  # real tokens only
                        out = model(input_ids=item["tokens"][start:end].unsqueeze(0),
                                    output_router_logits=True)
                        logits = [x for x in out.router_logits if x is not None]
                        for layer, x in zip(moe_layers, logits):
                            per_layer[layer].append(x.reshape(-1, x.shape[-1]))
                for layer in moe_layers:
                    aux[layer].append(hand_aux_loss(torch.cat(per_layer[layer]), top_k))
    return loss_sum / count, count, {layer: sum(v) / len(v) for layer, v in aux.items()}


def clip_probe(trainer, max_norm: float) -> dict:
    """One forward/backward of global batch 0 before training, then the gradient norm and the
    clipping as megatron-core's ``ChainedOptimizer.step`` does them (dense and expert
    optimizers). ``hand_norm``: ``sqrt(sum g^2)`` over this rank's parameters, the whole
    model's at TP1 PP1 EP1 (the single-rank reference); ``norm``: the optimizer's;
    ``clipped_norm``: the optimizer's after clipping to ``max_norm``; ``scale_dev``: the worst
    relative deviation over every parameter, on every rank, of its gradient's scale from
    ``max_norm / norm``."""
    import torch
    import torch.distributed as dist
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for m in trainer.model:
        m.train()
        m.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    trainer.forward_loss(trainer.train_ds, trainer._rows(0), forward_only=False)
    if trainer.moe_metrics is not None:  # drop the probe's routing statistics
        trainer.moe_metrics.collect(len(trainer._rows(0)))
    opt = trainer.optimizer
    opt.prepare_grads()
    parts = getattr(opt, "chained_optimizers", [opt])  # dense and expert optimizers
    params = [p for o in parts for p in o.get_parameters()]
    before = [p.grad.detach().double().norm() for p in params]
    hand = float(torch.stack(before).square().sum().sqrt())
    norm = opt.get_grad_norm()
    for o in parts:
        clip_grad_by_total_norm_fp32(o.get_parameters(), max_norm=max_norm, total_norm=norm)
    scale = max_norm / (norm + 1e-6)  # megatron-core's clip coefficient
    dev = torch.tensor(max((float(p.grad.double().norm()) / float(b) / scale - 1.0) ** 2
                           for p, b in zip(params, before) if b > 0) ** 0.5)
    dist.all_reduce(dev, op=dist.ReduceOp.MAX)
    out = {"hand_norm": hand, "norm": float(norm), "clipped_norm": float(opt.get_grad_norm()),
           "scale_dev": float(dev), "params": len(params),
           "elements": sum(p.numel() for p in params), "max_norm": max_norm}
    for m in trainer.model:
        m.zero_grad_buffer()
    opt.zero_grad()
    return out


def run_training(runs, hf) -> dict:
    import torch.distributed as dist

    from megatron.sft.training.arguments import TrainConfig
    from megatron.sft.training.trainer import Trainer

    import time

    results = {"seconds": {}}  # wall time of each run, for the record
    for name, fields in runs.items():
        start = time.perf_counter()
        use_layout(None)
        fields = dict(fields)
        rewind = fields.pop("rewind_to", None)
        probe = fields.pop("probe_clip", None)
        if rewind is not None and dist.get_rank() == 0:
            Path(fields["load"], "latest_checkpointed_iteration.txt").write_text(f"{rewind}\n")
        reshard = fields.pop("reshard_from", None)
        if reshard is not None and dist.get_rank() == 0:
            from megatron.sft.lora.reshard import reshard_any
            from megatron.sft.runtime.layout import ParallelLayout

            source, iteration, ep = reshard
            reshard_any(source, fields["load"], ParallelLayout(1, 1, ep=ep),
                               iteration=iteration, progress=False)
        refused = fields.pop("expect_refusal", False)
        dist.barrier()
        trainer = Trainer(TrainConfig(**fields), log=lambda m: None)
        if refused:  # a run that must stop in setup: its error, as the user would read it
            try:
                trainer.setup()
                results[name] = "set up without an error"
            except Exception as e:  # noqa: BLE001 - the test asserts which one
                results[name] = f"{type(e).__name__}: {e}"
            trainer.close()
            del trainer
            continue
        trainer.setup()
        if probe is not None:
            results[f"{name}/clip"] = clip_probe(trainer, probe)
        history = trainer.train()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, history if trainer.is_logger else None)
        results[name] = next(h for h in gathered if h is not None)
        results["seconds"][name] = round(time.perf_counter() - start, 2)
        if hf and name.startswith("aux") and "hand_aux" not in results and dist.get_rank() == 0:
            shape = trainer.shape
            loss, tokens, aux = references(hf, trainer.train_ds, fields, trainer.dp_size,
                                           shape.moe.layers, shape.moe.top_k)
            results.update(hf_loss=loss, hf_tokens=tokens, hand_aux=aux)
        trainer.close()
        del trainer
        # threads of this process once each run is released: layout switches must not leak
        # gloo groups (a live run's count differs by layout: Megatron-FSDP's has ~48 more)
        gc.collect()
        results.setdefault("threads", []).append(len(os.listdir("/proc/self/task")))
    return results


def check_uneven_collectives() -> dict:
    """cpu_mode's (e): megatron-core's uneven TP gather / reduce-scatter on gloo, against
    what they mean, over all ranks (rank r contributes r + 1 rows)."""
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.new_group(list(range(world)))
    sizes = [r + 1 for r in range(world)]
    mine = torch.full((sizes[rank], 3), float(rank))
    gathered = mappings._gather_along_first_dim(mine, group, output_split_sizes=sizes)
    want = torch.cat([torch.full((n, 3), float(r)) for r, n in enumerate(sizes)])
    full = torch.arange(sum(sizes) * 3, dtype=torch.float32).reshape(-1, 3) * (rank + 1)
    scattered = mappings._reduce_scatter_along_first_dim(full, group, input_split_sizes=sizes)
    start = sum(sizes[:rank])
    total = sum(r + 1 for r in range(world))
    want_rs = torch.arange(sum(sizes) * 3, dtype=torch.float32).reshape(-1, 3)[
        start:start + sizes[rank]] * total
    ok = torch.tensor([float(torch.equal(gathered, want) and torch.equal(scattered, want_rs))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return {"uneven_gather_and_reduce_scatter": bool(ok.item())}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch.distributed as dist

    from megatron.sft.runtime.distributed import initialize_distributed
    from megatron.sft.runtime.layout import ParallelLayout

    initialize_distributed(ParallelLayout())  # the process group; each case sets its layout
    out = {"shims": check_uneven_collectives(),
           "parity": run_parity(spec.get("parity", [])),
           "train": run_training(spec.get("runs", {}), spec.get("hf"))}
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
    from megatron.sft.runtime.distributed import destroy_distributed

    destroy_distributed(wait_for_peers=True)
