"""torchrun worker: several Mixture-of-Experts training runs in one launch.

``moe_train_worker.py SPEC.json``; SPEC: ``out`` (JSON written by rank 0), ``hf`` (the HF model
the checkpoints came from), ``runs`` (``{name: TrainConfig fields}``, run in order; between runs
the model-parallel state is rebuilt on the same process group, so layouts may differ; a run's
``rewind_to: N`` first points its ``--load`` directory's tracker file back at iteration N, as a
user rolls back).

Rank 0 also writes the references of global batch 0: ``hf_loss`` (transformers' masked loss,
each packed sample on its own) and ``hand_aux`` (megatron-core's load-balancing formula,
computed here by hand from transformers' router logits of the same tokens, per MoE layer,
averaged over the micro-batches of every data-parallel rank of the first run whose name starts
with ``aux``).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))


def hand_aux_loss(router_logits, top_k: int):
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
                    for start, end in zip(cu[:-1], cu[1:]):
                        out = model(input_ids=item["tokens"][start:end].unsqueeze(0),
                                    output_router_logits=True)
                        logits = [x for x in out.router_logits if x is not None]
                        for layer, x in zip(moe_layers, logits):
                            per_layer[layer].append(x.reshape(-1, x.shape[-1]))
                for layer in moe_layers:
                    aux[layer].append(hand_aux_loss(torch.cat(per_layer[layer]), top_k))
    return loss_sum / count, count, {layer: sum(v) / len(v) for layer, v in aux.items()}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch.distributed as dist

    from megatron.sft.runtime.distributed import initialize_distributed
    from megatron.sft.runtime.layout import ParallelLayout
    from megatron.sft.training.arguments import TrainConfig
    from megatron.sft.training.trainer import Trainer

    initialize_distributed(ParallelLayout())  # the process group; each run sets its layout
    results = {}
    for name, fields in spec["runs"].items():
        from megatron.core import parallel_state as ps

        from megatron.sft.runtime.parallel_dims import set_parallel_dims

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
            set_parallel_dims(None)
        fields = dict(fields)
        rewind = fields.pop("rewind_to", None)
        if rewind is not None and dist.get_rank() == 0:
            Path(fields["load"], "latest_checkpointed_iteration.txt").write_text(f"{rewind}\n")
        dist.barrier()
        trainer = Trainer(TrainConfig(**fields), log=lambda m: None)
        trainer.setup()
        history = trainer.train()
        if trainer.run_lock is not None:
            trainer.run_lock.release()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, history if trainer.is_logger else None)
        results[name] = next(h for h in gathered if h is not None)
        if name.startswith("aux") and "hand_aux" not in results and dist.get_rank() == 0:
            shape = trainer.shape
            loss, tokens, aux = references(spec["hf"], trainer.train_ds, fields,
                                           trainer.dp_size, shape.moe.layers, shape.moe.top_k)
            results.update(hf_loss=loss, hf_tokens=tokens, hand_aux=aux)
        del trainer
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
    from megatron.sft.runtime.distributed import destroy_distributed

    destroy_distributed(wait_for_peers=True)
