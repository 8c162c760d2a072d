"""torchrun worker for LoRA tests.

``lora_worker.py SPEC.json``: SPEC holds ``mode``, ``out`` (JSON written by rank 0),
``config`` (TrainConfig fields) and ``hf`` (the base HF directory).

- ``peft_loss``: adapters re-initialised with B != 0 (``b_std``), the masked loss of global
  batch 0 through megatron-core, the adapters saved (iteration 0) and exported as an HF PEFT
  adapter by our exporter, then loaded into ``peft.get_peft_model(hf, LoraConfig(...))`` built
  here from the flags (not from our adapter_config.json) and the same loss computed there.
- ``train``: run the loop; besides the history, report whether the base weights stayed
  bit-identical, which parameters got DDP grad buffers, how many elements the optimizer
  holds and its state bytes (summed over ranks).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_worker import masked_hf_loss  # noqa: E402


def peft_reference(spec, cfg, dataset, adapter_dir) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32,
                                                attn_implementation="eager")
    # Written out here, not taken from our exporter's table.
    hf_names = {"linear_qkv": ["q_proj", "k_proj", "v_proj"], "linear_proj": ["o_proj"],
                "linear_fc1": ["gate_proj", "up_proj"], "linear_fc2": ["down_proj"]}
    targets = [n for t in cfg.lora_target_modules.split(",") for n in hf_names[t]]
    model = get_peft_model(base, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                            target_modules=targets, lora_dropout=0.0))
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    model.eval()
    total, count = masked_hf_loss(model, dataset, range(cfg.global_batch_size))
    return {"hf": total / count, "hf_tokens": count, "peft_missing": missing,
            "peft_unexpected": list(result.unexpected_keys), "adapter_tensors": len(weights)}


def main() -> None:
    run(json.loads(Path(sys.argv[1]).read_text()))
    from megatron.sft.runtime.distributed import destroy_distributed

    destroy_distributed(wait_for_peers=True)


def run(spec: dict) -> None:
    """One scenario in this process group; rank 0 / the logger saves its result to ``out``."""
    import torch

    from megatron.sft.lora.adapters import adapter_parameters, init_adapters
    from megatron.sft.lora.peft_export import export_lora_adapter
    from megatron.sft.training.arguments import TrainConfig
    from megatron.sft.training.batch import microbatch_rows
    from megatron.sft.training.lora_model import settings_from_config
    from megatron.sft.training.trainer import Trainer

    cfg = TrainConfig(**spec["config"])
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.setup()
    dist = torch.distributed
    rank = dist.get_rank()
    out: dict = {}
    if spec["mode"] == "peft_loss":
        init_adapters(trainer.model, settings_from_config(cfg, trainer.shape), seed=cfg.seed,
                      b_std=spec["b_std"])
        rows = microbatch_rows(0, cfg.global_batch_size, cfg.micro_batch_size,
                               trainer.dp_rank, trainer.dp_size)
        total = trainer.forward_loss(trainer.train_ds, rows)
        trainer.save()
        if rank == 0:
            adapter = Path(spec["out"]).with_suffix(".adapter")
            export_lora_adapter(cfg.save, adapter, spec["hf"])
            out = {"megatron": (total[0] / total[1]).item(), "megatron_tokens": int(total[1]),
                   "adapter_dir": str(adapter),
                   **peft_reference(spec, cfg, trainer.train_ds, adapter)}
    else:
        def base_params():
            return [(n, p) for m in trainer.model for n, p in m.named_parameters()
                    if ".lora." not in n]

        before = [p.detach().clone() for _, p in base_params()]
        history = trainer.train()
        adapters = {id(p) for p in adapter_parameters(trainer.model)}
        unchanged = all(torch.equal(b, p) for b, (_, p) in zip(before, base_params()))
        with_buffer = [n for m in trainer.model for n, p in m.named_parameters()
                       if hasattr(p, "main_grad")]
        adapters_buffered = all(hasattr(p, "main_grad") for m in trainer.model
                                for p in m.parameters() if id(p) in adapters)
        opt_numel, state_bytes = 0, 0
        for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
            for group in opt.optimizer.param_groups:
                opt_numel += sum(p.numel() for p in group["params"])
            for st in opt.optimizer.state.values():
                state_bytes += sum(t.numel() * t.element_size() for t in st.values()
                                   if torch.is_tensor(t) and t.dim() > 0)
        counts = torch.tensor([opt_numel, state_bytes, int(unchanged),
                               int(adapters_buffered)], dtype=torch.float64)
        summed = counts.clone()
        dist.all_reduce(summed)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, with_buffer)
        if trainer.is_logger:
            world = dist.get_world_size()
            out = {"history": history, "optimizer_numel": int(summed[0]),
                   "optimizer_state_bytes": int(summed[1]),
                   "base_unchanged": int(summed[2]) == world,
                   "adapters_buffered": int(summed[3]) == world,
                   "params_with_grad_buffer": sorted({n for g in gathered for n in g}),
                   "adapter_numel_this_rank": sum(p.numel()
                                                  for p in adapter_parameters(trainer.model))}
    if out:
        Path(spec["out"]).write_text(json.dumps(out))
    trainer.close()


if __name__ == "__main__":
    main()
