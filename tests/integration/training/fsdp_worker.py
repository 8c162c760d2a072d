"""One 2-rank process group (DP=2) that runs every Megatron-FSDP scenario of issue 19 in
sequence, and writes what each run did to a JSON file for test_fsdp.py: the same run without
FSDP (distributed optimizer) as the reference, the FSDP (optim_grads_params) curve with a
mid-run save, the resume from that save, the export of both, bf16 and recompute / dense
attention / unpacked rows under FSDP next to their references, and the refused combinations.

``fsdp_worker.py SPEC.json``: SPEC holds ``out``, ``ckpt`` (a converted TP1 checkpoint), ``data``,
``work`` (a scratch directory) and ``hf`` (the HF model the checkpoint came from).
"""

import json
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch.distributed as dist

    from megatron.sft.training.arguments import TrainConfig
    from megatron.sft.training.trainer import Trainer

    work = Path(spec["work"])
    results = {}

    def run(name, inspect=None, **overrides):
        """Train with the test's defaults plus ``overrides``; record history, logs, error.
        ``inspect(trainer)``: called after training, before the trainer is released."""
        cfg = dict(load=spec["ckpt"], data_path=spec["data"], seq_length=128,
                   micro_batch_size=1, global_batch_size=4, train_iters=5, lr=1e-3,
                   lr_decay_style="constant", no_progress=True, split="90,10,0",
                   clip_grad=1.0)
        cfg.update(overrides)
        logs, trainer, t0 = [], None, time.perf_counter()
        entry = {"logs": logs, "history": [], "error": None}
        try:
            trainer = Trainer(TrainConfig(**cfg), log=logs.append)
            trainer.setup()
            entry["start_iteration"] = trainer.iteration
            entry["history"] = trainer.train()
            if inspect is not None:
                inspect(trainer)
        except Exception as e:  # the faults under test surface here, as the CLI would see them
            entry["error"] = f"{type(e).__name__}: {e}"
            if not isinstance(e, ValueError):
                entry["traceback"] = traceback.format_exc()
        finally:
            if trainer is not None:
                trainer.close()
        entry["seconds"] = time.perf_counter() - t0
        results[name] = entry
        return trainer

    fsdp = dict(use_megatron_fsdp=True, data_parallel_sharding_strategy="optim_grads_params")
    # --- the reference and the FSDP run: 5 iterations, saved at 3 and 5. One micro-batch per
    #     rank: with more, FSDP reduce-scatters each micro-batch's gradients where DDP sums the
    #     micro-batches first, a different order of fp32 additions (the bf16 runs below have two)
    one = dict(micro_batch_size=2, eval_interval=5, eval_iters=2)  # + validation at the end
    run("base", use_distributed_optimizer=True, save=str(work / "base"), save_interval=3, **one)

    def sharded(trainer):
        shard = trainer.model[0].module.param_and_grad_buffer.parameter_groups[1]
        results["fsdp_weights_sharded"] = bool(shard.model_weight_buffer.is_data_distributed)

    run("fsdp", inspect=sharded, save=str(work / "fsdp"), save_interval=3, **fsdp, **one)
    files = sorted(p.name for p in (work / "fsdp" / "iter_0000005" / "mp_rank_00").iterdir())
    results["fsdp_files"] = files

    # --- resume the FSDP run from its iteration-3 save
    at_three = work / "fsdp_at_3"
    if dist.get_rank() == 0:
        shutil.copytree(work / "fsdp", at_three)
        (at_three / "latest_checkpointed_iteration.txt").write_text("3\n")
    dist.barrier()
    run("resumed", load=str(at_three), save=str(work / "resumed"), **fsdp, **one)

    # --- bf16 (two micro-batches per rank), and recompute + dense attention + unpacked rows,
    #     under FSDP next to the same runs without it (2 iterations)
    run("bf16_base", bf16=True, train_iters=2, use_distributed_optimizer=True)
    run("bf16_fsdp", bf16=True, train_iters=2, **fsdp)
    mixed = dict(recompute_granularity="full", attention_backend="dense", packing=False,
                 train_iters=2, **one)
    run("mixed_base", use_distributed_optimizer=True, **mixed)
    run("mixed_fsdp", **fsdp, **mixed)
    run("lora_fsdp", lora_rank=4, **fsdp)  # refused before anything is built

    # --- optimizer state saved under one sharding, resumed under another
    run("fsdp_without", load=str(work / "fsdp"), train_iters=6, use_distributed_optimizer=True)
    run("base_with_fsdp", load=str(work / "base"), train_iters=6, **fsdp)
    run("other_strategy", load=str(work / "fsdp"), train_iters=6, use_megatron_fsdp=True,
        data_parallel_sharding_strategy="optim")
    run("no_load_optim", load=str(work / "fsdp"), train_iters=6, no_load_optim=True)

    # --- the exported HF models, on the logging rank (the runs are over)
    if dist.get_rank() == dist.get_world_size() - 1:
        from safetensors.torch import load_file

        from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf

        def exported(name):
            out = work / f"{name}_hf"
            export_megatron_to_hf(work / name, out, spec["hf"], ExportOptions(progress=False))
            tensors = {}
            for f in sorted(out.glob("*.safetensors")):
                tensors.update(load_file(f))
            return tensors

        def max_diff(a, b):
            """``{HF tensor name: max abs difference}``."""
            assert sorted(a) == sorted(b), (sorted(a), sorted(b))
            return {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}

        t0 = time.perf_counter()
        try:
            base, sharded, resumed = exported("base"), exported("fsdp"), exported("resumed")
            results["export_diff"] = max_diff(base, sharded)
            results["resume_export_diff"] = max_diff(sharded, resumed)
        except Exception:
            results["export_traceback"] = traceback.format_exc()
        results["export_seconds"] = time.perf_counter() - t0
        Path(spec["out"]).write_text(json.dumps(results))
    from megatron.sft.runtime.distributed import destroy_distributed

    destroy_distributed(wait_for_peers=True)


if __name__ == "__main__":
    main()
