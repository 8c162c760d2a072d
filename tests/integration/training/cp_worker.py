"""torchrun worker (4 ranks): context parallelism, sequence parallelism and the chunked loss,
many layouts in one launch (megatron-core's parallel state is rebuilt between them; the process
group stays).

``cp_worker.py SPEC.json``; SPEC holds ``out`` (JSON written by global rank 0) and

- ``model``: ``{"models": [{name, hf, ckpts: {"TPxPPy": dir}}], "layouts": [[tp, pp, cp, sp]],
  "rows", "seq_length"}`` (a model's own ``layouts`` replace the spec's). For every model and
  layout, one packed micro-batch (``rows`` =
  document lengths per row) forward and backward through megatron-core's schedule with the
  ``sdpa`` backend: the max |logits - transformers| over this rank's real tokens (HF runs each
  document alone), the masked loss sum over the CP group vs transformers', and every
  parameter's gradient summed over CP (and over TP for sequence-parallel norms, as
  ``finalize_model_grads`` does) vs the CP1 layout with the same TP x PP. The layouts in
  ``chunked_layouts`` (default: all) run a second time with the chunked loss: its loss and
  gradients vs the unchunked ones.
- ``train``: ``[{name, config, resume_from?, rewind_to?}]`` TrainConfig runs in order; each
  writes its per-iteration history. ``rewind_to`` points the tracker of ``resume_from``'s
  ``--save`` back to that iteration first (a rolled-back resume). ``hf_loss`` entries instead
  give the global batch 0 loss through ``Trainer.forward_loss`` and transformers' on the same
  rows.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


_T0 = [time.perf_counter()]


def _log(what):
    """Seconds per scenario on rank 0's stdout (what the launch costs, scenario by scenario)."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        now = time.perf_counter()
        print(f"[cp_worker] {what}: {now - _T0[0]:.1f}s", flush=True)
        _T0[0] = now


def reset():
    """Drop megatron-core's parallel state (the process group stays), so the next layout can
    initialise it."""
    from megatron.sft.runtime.distributed import release_model_parallel

    release_model_parallel()  # closes the gloo groups and forgets the parallel dims too


def reinit(layout):
    """megatron-core's parallel state for ``layout`` on the existing process group."""
    from megatron.sft.runtime.distributed import initialize_distributed

    reset()
    return initialize_distributed(layout)


def hf_document_logits(hf_dir, tokens, rows, vocab):
    """transformers' logits, each document run alone; computed on rank 0 and broadcast (the
    other ranks need not import transformers)."""
    import torch
    import torch.distributed as dist

    ref = torch.zeros(tokens.shape + (vocab,))
    if dist.get_rank() == 0:
        ref = _hf_document_logits(hf_dir, tokens, rows)
    dist.broadcast(ref, src=0)
    return ref


def _hf_document_logits(hf_dir, tokens, rows):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                              attn_implementation="eager")
    ref = torch.zeros(tokens.shape + (hf.config.vocab_size,))
    with torch.no_grad():
        for b, lengths in enumerate(rows):
            start = 0
            for n in lengths:
                ref[b, start:start + n] = hf(tokens[b:b + 1, start:start + n]).logits[0]
                start += n
    return ref


def run_model_layout(pair, layout, sp, chunked, data, seq):
    """``(local logits [b, s/CP, V] or None, loss sum over CP, grads summed like
    finalize_model_grads)`` of one forward/backward at ``layout``."""
    import torch
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron.sft.model.layer_impl import LayerImpl
    from megatron.sft.runtime.parallel_dims import parallel_dims
    from megatron.sft.training.batch import local_micro_batch, masked_loss_sum
    from megatron.sft.training.chunked_loss import (
        chunked_loss_sum,
        defer_output_layer,
        output_weight,
    )
    from megatron.sft.training.loss import vocab_parallel_token_loss
    from megatron.sft.model.builder import build_model_from_checkpoint

    dims = parallel_dims()
    tokens, labels, positions, cu, mask, vocab = data
    impl = LayerImpl("local", "sdpa", pair.get("experts", "sequential"))
    chunks, _, _ = build_model_from_checkpoint(
        pair["ckpts"][f"TP{layout.tp}PP{layout.pp}"], impl=impl, seq_length=seq,
        sequence_parallel=sp, calculate_per_token_loss=True, **pair.get("overrides", {}))
    if chunked:
        defer_output_layer(chunks)
    attention = impl.attention_inputs(cu, tokens.shape[0], seq, None, cp_size=layout.cp,
                                      cp_rank=dims.cp_rank)
    batch = local_micro_batch({"tokens": tokens, "labels": labels, "loss_mask": mask,
                               "position_ids": positions}, attention.local_index)
    collected, losses = [], []

    def forward_step(data_iterator, model):
        next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"],
                       attention_mask=attention.attention_mask,
                       packed_seq_params=attention.packed_seq_params)

        def loss_func(out):
            if chunked:
                loss_sum, count = chunked_loss_sum(  # chunks of 7 tokens: several per rank
                    out, output_weight(model), batch["labels"], batch["loss_mask"], vocab,
                    sequence_parallel=sp, tp_rank=dims.tp_rank, tp_group=dims.tp_group(),
                    chunk=7)
            else:
                collected.append(gather_from_tensor_model_parallel_region(out)[..., :vocab]
                                 .detach().float())
                loss_sum, count = masked_loss_sum(
                    vocab_parallel_token_loss(out, batch["labels"], vocab), batch["loss_mask"])
            losses.append(loss_sum.detach().clone())
            return loss_sum, count, {}

        return output, loss_func

    for m in chunks:
        m.train()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([0]), model=chunks[0],
        num_microbatches=1, seq_length=seq, micro_batch_size=tokens.shape[0],
        forward_only=False)
    grads = {}
    for name, p in chunks[0].named_parameters():
        if p.grad is None:
            continue
        g = p.grad.detach().clone()
        if sp and getattr(p, "sequence_parallel", False):
            dist.all_reduce(g, group=dims.tp_group())
        dist.all_reduce(g, group=dims.cp_group())
        grads[name] = g
    loss = torch.zeros((), dtype=torch.float64)
    if dims.is_last_stage:
        loss += losses[0].double()
    dist.all_reduce(loss, group=dims.cp_group())
    dist.all_reduce(loss, group=dims.loss_groups()[1])  # the pipeline: only the last stage has it
    index = attention.local_index
    if index is None:
        index = torch.arange(tokens.numel()).view(tokens.shape)
    return (collected[0] if collected else None), loss.item(), grads, index


def run_models(spec):
    import torch
    import torch.distributed as dist

    from attention_worker import packed_batch
    from megatron.sft.bridge.architectures import shape_of
    from megatron.sft.bridge.checkpoint_io import iteration_dir, read_metadata
    from megatron.sft.runtime.layout import ParallelLayout
    from megatron.sft.runtime.parallel_dims import parallel_dims

    seq, rows = spec["seq_length"], spec["rows"]
    out = {}
    for pair in spec["models"]:
        meta = read_metadata(iteration_dir(next(iter(pair["ckpts"].values()))))
        vocab = shape_of(meta.hf_config)[1].vocab_size
        tokens, labels, positions, cu, mask = packed_batch(rows, seq, vocab)
        ref = hf_document_logits(pair["hf"], tokens, rows, vocab)
        ref_loss = (torch.nn.functional.cross_entropy(
            ref.reshape(-1, vocab), labels.reshape(-1), reduction="none")
            * mask.reshape(-1)).sum().item()
        data = (tokens, labels, positions, cu, mask, vocab)
        cp1_grads = {}
        results = {}
        layouts = pair.get("layouts", spec["layouts"])
        for tp, pp, cp, sp in layouts:
            name = f"TP{tp}PP{pp}CP{cp}" + ("SP" if sp else "")
            layout = ParallelLayout(tp, pp, cp=cp)
            reinit(layout)
            logits, loss, grads, index = run_model_layout(pair, layout, sp, False, data, seq)
            c_loss, c_grads = loss, grads  # the chunked loss where the spec asks for it
            if [tp, pp, cp, sp] in pair.get("chunked_layouts",
                                             spec.get("chunked_layouts", layouts)):
                _, c_loss, c_grads, _ = run_model_layout(pair, layout, sp, True, data, seq)
            _log(f"{pair['name']} {name}")
            if cp == 1:
                cp1_grads[(tp, pp)] = grads
            base = cp1_grads[(tp, pp)]
            stats = torch.zeros(6, dtype=torch.float64)
            if logits is not None:
                real = mask.reshape(-1)[index.reshape(-1)].bool()
                want = ref.reshape(-1, vocab)[index.reshape(-1)][real]
                got = logits.reshape(-1, vocab)[real]
                stats[0] = (got - want).abs().max()
                stats[1] = want.abs().max()
            stats[2] = max((g - base[k]).abs().max().item() for k, g in grads.items())
            stats[3] = max(g.abs().max().item() for g in base.values())
            stats[4] = max((g - grads[k]).abs().max().item() for k, g in c_grads.items())
            stats[5] = float(set(grads) == set(base) == set(c_grads))
            flags = torch.tensor([stats[5].item()], dtype=torch.float64)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            results[name] = {
                "logits_max_abs_diff": stats[0].item(), "logits_abs_max": stats[1].item(),
                "grad_max_abs_diff_vs_cp1": stats[2].item(), "grad_abs_max": stats[3].item(),
                "chunked_grad_max_abs_diff": stats[4].item(), "same_grad_keys": bool(flags[0]),
                "loss_sum": loss, "hf_loss_sum": ref_loss, "chunked_loss_sum": c_loss,
                "describe": parallel_dims().describe()}
        out[pair["name"]] = results
    return out


def run_trainings(entries):

    import torch
    import torch.distributed as dist

    from megatron.sft.training.arguments import TrainConfig
    from megatron.sft.training.trainer import Trainer
    from train_worker import hf_reference_loss

    out = {}
    for entry in entries:
        cfg = TrainConfig(**entry["config"])
        if entry.get("rewind_to") and dist.get_rank() == 0:
            save = Path(entry["config"]["load"])
            (save / "latest_checkpointed_iteration.txt").write_text(f"{entry['rewind_to']}\n")
        dist.barrier()
        reset()  # Trainer.setup initialises the run's layout
        trainer = Trainer(cfg, log=lambda m: None)
        trainer.setup()
        if entry.get("hf_loss"):
            total = trainer.forward_loss(trainer.train_ds, trainer._rows(0))
            result = {"megatron": (total[0] / total[1]).item(), "megatron_tokens": int(total[1])}
            if dist.get_rank() == 0:
                ref_sum, ref_count = hf_reference_loss(entry["hf"], trainer.train_ds,
                                                       range(cfg.global_batch_size))
                result.update(hf=ref_sum / ref_count, hf_tokens=ref_count)
        else:
            result = trainer.train()
        result = {"result": result, "chunked_loss": trainer.chunked_loss,
                  "describe": trainer.dims.describe()}
        if cfg.save and dist.get_rank() == 0:  # the files of the last save
            last = sorted(Path(cfg.save).glob("iter_*"))[-1]
            result["files"] = sorted(str(f.relative_to(last)) for f in last.rglob("*.pt"))
        trainer.close()
        out[entry["name"]] = result
        _log(entry["name"])
        del trainer
        torch.distributed.barrier()
    return out if dist.get_rank() == 0 else None


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch.distributed as dist

    from megatron.sft.runtime.distributed import initialize_distributed
    from megatron.sft.runtime.layout import ParallelLayout

    initialize_distributed(ParallelLayout())
    _log("start")
    results = {}
    if "model" in spec:
        results["model"] = run_models(spec["model"])
    if "train" in spec:
        results["train"] = run_trainings(spec["train"])
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
    from megatron.sft.runtime.distributed import destroy_distributed

    destroy_distributed(wait_for_peers=True)
