"""The throughput worker: one trainer per configuration, timed steps, OOM handling."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Optional

from gpu_proof_parts.probes import _configs, _runnable
from gpu_proof_parts.processes import _paths, _wait_for, _write_json
from gpu_proof_parts import profile as profiling  # imports this module back: use at call time
from gpu_proof_parts.settings import TINY_SEQ


def child_throughput(args) -> int:
    """Every configuration in this one process, a Trainer each; rows are printed as
    ``ROW {json}`` and appended to state/throughput_rows.jsonl; restarted after a crash with
    the rows already there skipped."""
    p = _paths(args)
    state = p["state"]
    deadline = args.deadline or time.time() + 3600
    rows_file, current_file = state / "throughput_rows.jsonl", state / "throughput_current.json"
    done = {}
    if rows_file.exists():
        for line in rows_file.read_text().splitlines():
            r = json.loads(line)
            done[r["key"]] = r

    def emit(row: dict) -> None:
        done[row["key"]] = row
        with open(rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        print("ROW " + json.dumps(row), flush=True)


    from megatron.sft.runtime.distributed import destroy_distributed, quiet_megatron_import_warnings
    from megatron.sft.training.trainer import Trainer  # noqa: F401  (imported before the go)

    quiet_megatron_import_warnings()
    go = _wait_for(state / "throughput_go.json", deadline)  # the step's start, and its end
    if go is None:
        return 1
    deadline = go["deadline"]
    prep = _wait_for(state / "prep_throughput.json", deadline - 5)
    if prep is None or prep.get("status") != "ok":
        why = "inputs not ready" if prep is None else f"inputs: {prep.get('error')}"
        for c in _configs(args) + [{"key": "profile"}]:
            if c["key"] in done:
                continue
            cannot = _runnable(c["backend"], args.device) if "backend" in c else None
            emit(dict(c, status="skipped" if cannot else "failed", wall_s=0.0,
                      error=("skipped: no CUDA" if args.device != "cuda" else
                             f"skipped: {cannot}") if cannot else why))
        return 0
    print(f"## inputs ready ({prep['seconds']}s in the background)", flush=True)
    cuda = args.device == "cuda"
    warmup, iters = (2, 2) if args.tiny else (3, 5)
    # refined by the first configuration that runs
    timing = {"setup": 5.0, "iter": 0.3} if args.tiny else {"setup": 10.0, "iter": 1.5}
    compiled: set = set()
    profile_reserve = 8.0 if args.tiny else 45.0  # build, 1 + 2 steps, parsing the events
    configs = _configs(args)
    four_k = TINY_SEQ[4096] if args.tiny else 4096
    last_4k = max(i for i, c in enumerate(configs) if c["seq"] == four_k)
    # The profile runs once every 4k configuration is measured, before the 16k flex run
    # (the likeliest to be skipped for time); until then its time is kept in reserve.
    plan = configs[:last_4k + 1] + [{"key": "profile"}] + configs[last_4k + 1:]
    for c in plan:
        if c["key"] in done:
            continue
        if c["key"] == "profile":
            ok4k = [r for r in done.values() if r.get("status") == "ok" and
                    r.get("seq") == four_k]
            if not ok4k:
                emit({"key": "profile", "status": "skipped", "wall_s": 0.0,
                      "error": "skipped: no 4k configuration ran"})
                continue
            best = max(ok4k, key=lambda r: r["tokens_per_s"])
            _write_json(current_file, {"key": "profile", "config": best["key"],
                                       "t": time.time()})
            emit(profiling._profile(args, best, prep))
            continue
        why = _runnable(c["backend"], args.device)
        if why is not None:
            emit(dict(c, status="skipped", wall_s=0.0,
                      error=("skipped: no CUDA" if not cuda else f"skipped: {why}")))
            continue
        estimate = timing["setup"] + (warmup + iters + 1) * timing["iter"] * \
            (1.2 if c["seq"] > four_k else 1.0)
        if c["backend"] == "flex" and c["seq"] not in compiled and cuda:
            estimate += 45.0
        reserve = profile_reserve if "profile" not in done else 0.0
        left = deadline - time.time()
        if left < estimate + reserve:
            emit(dict(c, status="skipped", wall_s=0.0,
                      error=f"skipped: time budget (needs ~{estimate:.0f}s"
                            + (f" + {reserve:.0f}s kept for the profile" if reserve else "")
                            + f", {left:.0f}s left)"))
            continue
        _write_json(current_file, dict(c, t=time.time()))
        row = _measure(args, c, prep, warmup, iters)
        if row["status"] == "ok":
            timing["setup"] = row["setup_s"]
            timing["iter"] = max(row["ms_per_iter"] / 1e3, 0.05)
            if c["backend"] == "flex":
                compiled.add(c["seq"])
        emit(row)
    if args.trace and done.get("profile", {}).get("status") == "ok":
        emit(dict(done["profile"], trace=profiling._export_trace(args, deadline)))
    destroy_distributed()
    return 0


def _trainer(args, c: dict, prep: dict, train_iters: int, log_json: Optional[Path] = None):
    from megatron.sft.training.arguments import TrainConfig
    from megatron.sft.training.trainer import Trainer

    cfg = TrainConfig(
        load=prep["ckpt"], data_path=prep["data"][str(c["seq"])], split="100,0,0",
        seq_length=c["seq"], micro_batch_size=1, global_batch_size=c["gbs"],
        train_iters=train_iters, lr=1e-5, lr_decay_style="constant",
        use_distributed_optimizer=True, no_progress=True, attention_backend=c["backend"],
        bf16=args.device == "cuda", verify=False, log_interval=1000,
        recompute_granularity=None if c["recompute"] == "none" else c["recompute"],
        log_json=str(log_json) if log_json else None)
    return Trainer(cfg, log=lambda msg: print(f"  {msg}", flush=True))


def _release(box: list) -> float:
    """Drop the Trainer in ``box`` (the only reference left) and what it holds on the GPU;
    the GiB still allocated afterwards (a leak between configurations would show here)."""
    import gc

    import torch

    trainer = box.pop() if box else None
    if trainer is not None:
        lock = getattr(trainer, "run_lock", None)
        if lock is not None:
            lock.release()
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated() / 2**30
    return 0.0


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _measure(args, c: dict, prep: dict, warmup: int, iters: int) -> dict:
    import torch

    print(f"## {c['key']}: building (global batch {c['gbs']})", flush=True)
    t0 = time.time()
    row = dict(c, status="ok")
    box: list = []  # the Trainer, held here only, so that _release can free it
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        box.append(_trainer(args, c, prep, warmup + iters))
        box[0].setup()
        row["setup_s"] = round(time.time() - t0, 1)
        history = box[0].train()
        measured = history[warmup:]
        row["first_iter_s"] = round(history[0]["ms_per_iter"] / 1e3, 2)
        for key in ("tokens_per_s", "ms_per_iter", "tflops_per_gpu", "mfu"):
            values = [r[key] for r in measured if r.get(key) is not None]
            if values:
                row[key] = statistics.median(values)
        mem = [r["max_memory_gib"] for r in measured if r.get("max_memory_gib") is not None]
        if mem:
            row["max_memory_gib"] = max(mem)
        row["loss"] = [round(r["loss"], 4) for r in history]
    except Exception as e:
        row["status"] = "OOM" if _is_oom(e) else "error"
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        import traceback

        traceback.print_exc()
    finally:
        row["leftover_gib"] = round(_release(box), 2)
    row["wall_s"] = round(time.time() - t0, 1)
    return row
