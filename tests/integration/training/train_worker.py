"""torchrun worker for training tests.

``train_worker.py SPEC.json``: SPEC holds ``mode`` ("hf_loss" or "train"), ``out`` (JSON
written by the logging rank) and ``config`` (TrainConfig fields).

- ``hf_loss``: the masked loss of global batch 0 through megatron-core's real schedule, and the
  same loss from ``transformers`` (labels -100 outside the mask); packed rows are split back into
  their samples, each run through HF on its own.
- ``loss``: the same megatron-core loss alone (no transformers run).
- ``train``: run the loop; write the per-iteration history.
- ``train_ddp``: the same, plus whether data-parallel communication overlapped compute.
- ``train_rng``: the same, plus a fingerprint of the RNG states after training (CPU and
  megatron-core's tensor-parallel tracker).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def masked_hf_loss(model, dataset, rows) -> tuple[float, int]:
    """Sum of masked next-token losses of a transformers ``model`` over ``rows`` (labels -100
    outside the mask), each packed sample run on its own; also used by ``lora_worker.py``."""
    import torch

    from megatron.sft.training.batch import valid_cu_seqlens

    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            item = dataset[r]
            cu = valid_cu_seqlens(item["cu_seqlens"]).tolist()
            for start, end in zip(cu[:-1], cu[1:]):
                tokens = item["tokens"][start:end].unsqueeze(0)
                labels = item["labels"][start:end].clone()
                mask = item["loss_mask"][start:end] > 0
                labels[~mask] = -100
                logits = model(input_ids=tokens).logits[0].float()
                total += torch.nn.functional.cross_entropy(
                    logits, labels, ignore_index=-100, reduction="sum").item()
                count += int(mask.sum())
    return total, count


def hf_reference_loss(hf_dir, dataset, rows) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    return masked_hf_loss(model, dataset, rows)


def rng_fingerprint() -> str:
    """SHA-256 of the CPU RNG state and every megatron-core tensor-parallel RNG tracker state."""
    import hashlib

    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes())
    for name, state in sorted(get_cuda_rng_tracker().get_states().items()):
        digest.update(name.encode() + state.cpu().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    run(json.loads(Path(sys.argv[1]).read_text()))
    from megatron.sft.runtime.distributed import destroy_distributed

    destroy_distributed(wait_for_peers=True)


def run(spec: dict) -> None:
    """One scenario in this process group; the writing rank saves its result to ``out``."""
    import torch

    from megatron.sft.training.arguments import TrainConfig
    from megatron.sft.training.batch import microbatch_rows
    from megatron.sft.training.trainer import Trainer

    cfg = TrainConfig(**spec["config"])
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.setup()
    rank = torch.distributed.get_rank()
    if spec["mode"] == "loss":  # megatron-core's loss of global batch 0 only
        rows = microbatch_rows(0, cfg.global_batch_size, cfg.micro_batch_size,
                               trainer.dp_rank, trainer.dp_size)
        total = trainer.forward_loss(trainer.train_ds, rows)
        if rank == 0:
            Path(spec["out"]).write_text(json.dumps({"megatron": (total[0] / total[1]).item(),
                                                     "megatron_tokens": int(total[1])}))
    elif spec["mode"] == "hf_loss":
        rows = microbatch_rows(0, cfg.global_batch_size, cfg.micro_batch_size,
                               trainer.dp_rank, trainer.dp_size)
        total = trainer.forward_loss(trainer.train_ds, rows)
        if rank == 0:
            ref_sum, ref_count = hf_reference_loss(spec["hf"], trainer.train_ds,
                                                   range(cfg.global_batch_size))
            Path(spec["out"]).write_text(json.dumps({
                "megatron": (total[0] / total[1]).item(), "megatron_tokens": int(total[1]),
                "hf": ref_sum / ref_count, "hf_tokens": ref_count,
                "packed_samples_per_row": float(sum(
                    len(trainer.train_ds.sample_ids(r)) for r in range(cfg.global_batch_size))
                    / cfg.global_batch_size)}))
    else:
        history = trainer.train()
        ddp = trainer.model[0].ddp_config
        if trainer.is_logger and spec["mode"] == "train_ddp":
            Path(spec["out"]).write_text(json.dumps({
                "history": history, "overlap_grad_reduce": ddp.overlap_grad_reduce,
                "overlap_param_gather": ddp.overlap_param_gather}))
        elif trainer.is_logger and spec["mode"] == "train_rng":
            Path(spec["out"]).write_text(json.dumps({"history": history,
                                                     "rng": rng_fingerprint()}))
        elif trainer.is_logger:
            Path(spec["out"]).write_text(json.dumps(history))
    trainer.close()


if __name__ == "__main__":
    main()
