"""One process that makes every resume and save fault of issue 17 for real, one training run
after another (a world of one: the runs share one process group, which is most of the cost),
and writes what each run did or said to a JSON file for test_resume_and_saves.py.

``resume_worker.py SPEC.json``: SPEC holds ``out``, ``ckpt`` (a converted TP1 checkpoint),
``data``, ``work`` (a scratch directory), ``small_fs`` (a tmpfs smaller than one checkpoint) and
``restart_fs`` (a tmpfs that holds two).
"""

import json
import shutil
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from megatron.sft.bridge.integrity import file_digest
    from megatron.sft.bridge.reshard import reshard_checkpoint
    from megatron.sft.runtime.layout import ParallelLayout
    from megatron.sft.training.arguments import TrainConfig
    from megatron.sft.training.trainer import Trainer

    work = Path(spec["work"])
    results = {}

    def run(name, **overrides):
        """Train with the test's defaults plus ``overrides``; record history, logs, error."""
        cfg = dict(load=spec["ckpt"], data_path=spec["data"], seq_length=128,
                   micro_batch_size=2, global_batch_size=4, train_iters=4, lr=1e-3,
                   min_lr=1e-4, lr_decay_style="cosine", lr_warmup_iters=1, no_progress=True,
                   split="90,10,0", clip_grad=0.0)
        cfg.update(overrides)
        logs, trainer = [], None
        entry = {"logs": logs, "history": [], "error": None}
        try:
            trainer = Trainer(TrainConfig(**cfg), log=logs.append)
            trainer.setup()
            entry["start_iteration"], entry["start_row"] = trainer.iteration, \
                trainer.data_position
            entry["history"] = trainer.train()
            entry["end_row"] = trainer.data_position
        except Exception as e:  # the faults under test surface here, as the CLI would see them
            entry["error"] = f"{type(e).__name__}: {e}"
            if not isinstance(e, ValueError):
                entry["traceback"] = traceback.format_exc()
        finally:
            if trainer is not None:
                trainer.close()
        results[name] = entry
        return entry

    # --- a run to resume: iterations 1-4, saved at 2 and 4
    run_a = work / "run_a"
    run("a", save=str(run_a), save_interval=2)
    results["a"]["files"] = sorted(p.name for p in run_a.iterdir())

    # --- the end of the schedule and past it
    run("done", load=str(run_a), save=str(work / "done"))
    run("below", load=str(run_a), train_iters=3)
    run("lr_changed", load=str(run_a), lr=5e-4, train_iters=6)
    run("override", load=str(run_a), lr=5e-4, train_iters=6, override_opt_param_scheduler=True)
    run("extended", load=str(run_a), train_iters=6)

    # --- the data position
    run("seq_changed", load=str(run_a), seq_length=256, train_iters=5)
    run("seq_reset", load=str(run_a), seq_length=256, train_iters=5, reset_data_position=True)
    at_two = work / "run_a_at_2"
    shutil.copytree(run_a, at_two)
    (at_two / "latest_checkpointed_iteration.txt").write_text("2\n")
    run("gbs_changed", load=str(at_two), global_batch_size=8, train_iters=3)

    # --- reshard keeps the iteration, the schedule and the data position
    resharded = work / "run_a_resharded"
    reshard_checkpoint(run_a, resharded, ParallelLayout(1, 1), progress=False)
    run("from_reshard", load=str(resharded), train_iters=6, save=str(work / "run_b"))

    # --- --save = the converted --load: refused when a save would land on its iteration, and
    #     never pruned when none does
    conv = Path(spec["ckpt"])
    results["conv_digest_before"] = file_digest(conv / "iter_0000001/mp_rank_00/model_optim_rng.pt").sha256
    conv_copy = work / "conv_copy"
    shutil.copytree(conv, conv_copy)
    run("save_onto_base", load=str(conv_copy), save=str(conv_copy), save_interval=1,
        train_iters=2)
    run("prune_keeps_base", load=str(conv_copy), save=str(conv_copy), save_interval=2,
        train_iters=3, keep_last=1)
    results["conv_copy_files"] = sorted(p.name for p in conv_copy.iterdir())
    results["conv_digest_after"] = file_digest(conv_copy / "iter_0000001/mp_rank_00/model_optim_rng.pt").sha256

    # --- issue 30: a run resumed inside its converted --load (false refusal), new Adam
    #     settings on resume, an interval save followed by a stop at the same iteration
    run("resume_in_base", load=str(conv_copy), save=str(conv_copy), save_interval=1,
        train_iters=4)
    adam = dict(load=str(run_a), train_iters=5, adam_beta1=0.1, adam_beta2=0.5, adam_eps=1e-3)
    run("adam_changed", **adam)
    run("adam_override", **adam, override_opt_param_scheduler=True, save=str(work / "run_adam"))
    import torch

    from megatron.sft.training.resume import saved_optimizer_settings

    saved = torch.load(work / "run_adam" / "iter_0000005" / "mp_rank_00" /
                       "model_optim_rng.pt", weights_only=True, map_location="cpu")
    results["adam_saved"] = saved_optimizer_settings(saved["optimizer"])
    run("stop_after_interval_save", save=str(work / "run_e"), save_interval=2, exit_interval=2)

    # --- a full disk during a save, and the restart on a disk a dead save filled
    if spec["small_fs"]:
        small = Path(spec["small_fs"])
        run("disk_full", save=str(small / "run_c"), train_iters=1, lr_warmup_iters=0)
        results["disk_full_left"] = sorted(p.name for p in (small / "run_c").iterdir())
        run_d = Path(spec["restart_fs"]) / "run_d"
        shutil.copytree(run_a / "iter_0000002", run_d / "iter_0000002")
        (run_d / "latest_checkpointed_iteration.txt").write_text("2\n")
        stale = run_d / "iter_0000003.partial"  # a save killed mid-way, filling the disk
        stale.mkdir()
        with open(stale / "model_optim_rng.pt.tmp", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        run("restart_on_full_disk", load=str(run_d), save=str(run_d), train_iters=3)
        results["restart_left"] = sorted(p.name for p in run_d.iterdir())

    Path(spec["out"]).write_text(json.dumps(results))
    from megatron.sft.runtime.distributed import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main()
