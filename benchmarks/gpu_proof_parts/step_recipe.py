"""Step 4 (recipe): the 1.5B / 16k recipe train -> resume -> export -> HF forward."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import time
from pathlib import Path

from megatron.sft.runtime.ports import free_port
from gpu_proof_parts.processes import StepTimeout, _free_gb, _read_json, _wait_for, _write_json
from gpu_proof_parts.settings import REPO


def step_recipe(proof, res: dict, deadline: float) -> None:
    p, details = proof.paths, res["details"]
    marker = p["state"] / "prep_recipe.json"
    prep = _wait_for(marker, deadline, alive=lambda: proof.prep is not None and
                     proof.prep.alive())
    if prep is None:
        if time.time() >= deadline:
            raise StepTimeout("the inputs were not ready (prep.log)")
        tail = proof.prep.last_error() if proof.prep else "not started"
        res["status"], res["key"] = "failed", f"preparing the inputs: {tail}"
        return
    details["prepare"] = prep
    if prep["status"] != "ok":
        res["status"], res["key"] = "failed", f"preparing the inputs: {prep.get('error')}"
        return
    need = 2 * prep["checkpoint_gb"] + 1
    free = _free_gb(p["assets"])
    details["free_gb"] = round(free, 1)
    if free < need:
        res["status"] = "failed"
        res["key"] = (f"{p['assets']} has {free:.0f} GB free; two checkpoints need "
                      f"~{need:.0f} GB: pass --workdir on a bigger disk")
        return
    shutil.rmtree(p["save"], ignore_errors=True)
    shutil.rmtree(p["export"], ignore_errors=True)
    env = dict(proof.env, ASSETS_DIR=str(p["assets"]), GPUS_PER_NODE="1", GBS="4",
               SAVE_INTERVAL="2", KEEP_LAST="1")
    if proof.args.tiny:
        env["MAX_LEN"] = env["SEQ_LEN"] = "256"  # the recipe names its data by MAX_LEN
    recipe = ["bash", str(REPO / "scripts/sft/SFT_Hybrid_R1_1.5B_OpenThoughts_1M.sh"),
              "train"]
    log_json = p["save"] / "train_log.jsonl"
    for iters, expect in ((4, None), (6, 4)):
        env_run = dict(env, TRAIN_ITERS=str(iters), MASTER_PORT=str(free_port()))
        proc = proof.run(recipe, deadline, "recipe.log", env=env_run)
        run = {"seconds": round(proc.seconds, 1), "rc": proc.p.returncode}
        details[f"train_{iters}"] = run
        if proc.timed_out:
            raise StepTimeout(f"TRAIN_ITERS={iters} did not finish")
        if proc.p.returncode != 0:
            res["status"], res["key"] = "failed", f"TRAIN_ITERS={iters}: {proc.last_error()}"
            return
        text = "\n".join(proc.lines)
        records = [json.loads(x) for x in log_json.read_text().splitlines()] \
            if log_json.exists() else []
        iterations = [r["iteration"] for r in records]
        latest = (p["save"] / "latest_checkpointed_iteration.txt").read_text().strip() \
            if (p["save"] / "latest_checkpointed_iteration.txt").exists() else None
        first_log = re.search(r"iter \d+/\d+ \|[^\r\n]*", text)  # tqdm may precede it
        run.update(iterations=iterations, latest=latest,
                   log_line=first_log.group(0) if first_log else "")
        if expect is not None:
            m = re.search(r"resumed from (\S+) at iteration (\d+)", text)
            run["resumed"] = m.group(0) if m else None
            if not m or int(m.group(2)) != expect or Path(m.group(1)) != p["save"]:
                res["status"] = "failed"
                res["key"] = (f"TRAIN_ITERS={iters} did not resume from {p['save']} at "
                              f"iteration {expect}: {run['resumed']}")
                return
        if iterations != list(range(1, iters + 1)) or latest != str(iters):
            res["status"] = "failed"
            res["key"] = (f"TRAIN_ITERS={iters}: logged iterations {iterations}, latest "
                          f"checkpoint {latest}")
            return
    details["records"] = records
    fwd_json = p["state"] / "forward.json"
    fwd_json.unlink(missing_ok=True)
    fwd, why = None, ""
    if proof.prep is not None and proof.prep.alive():  # it waits for this, imports done
        _write_json(p["state"] / "forward_request.json", {"t": time.time()})
        fwd = _wait_for(fwd_json, deadline, alive=proof.prep.alive)
        if fwd is None and time.time() >= deadline:
            proof.prep.stop()
            raise StepTimeout("merge_and_export.sh + the transformers forward did not "
                              "finish")
        why = "" if fwd is not None else f"(background process: {proof.prep.last_error()})"
    if fwd is None:  # no background process to ask: a process of its own
        proc = proof.run(proof.child("forward", deadline), deadline, "recipe.log")
        fwd = _read_json(fwd_json)
        if proc.timed_out:
            raise StepTimeout("merge_and_export.sh + the transformers forward did not "
                              "finish")
        why = proc.last_error()
    details["export_and_forward"] = fwd
    if not fwd or not fwd.get("finite"):
        why = (fwd or {}).get("error") or why
        res["status"], res["key"] = "failed", f"export / transformers forward: {why}"
        return
    res["status"] = "ok"
    first, last = records[0], records[-1]
    parts = [f"loss {first['loss']:.3f} -> {last['loss']:.3f} over 6 its",
             "resumed at iteration 4"]
    gpu = [r for r in records if r.get("mfu") is not None]
    if proof.cuda:  # the goal: the log shows loss, tokens/s, MFU and memory
        line = details["train_4"].get("log_line", "")
        details["log_shows_mfu_and_memory"] = all(w in line for w in
                                                  ("loss", "tok/s", "MFU", "mem"))
        if not details["log_shows_mfu_and_memory"]:
            parts.append(f"the log line lacks MFU or memory: {line!r}")
    if gpu:
        parts.append(f"{statistics.median(r['tokens_per_s'] for r in gpu):,.0f} tok/s, MFU "
                     f"{100 * statistics.median(r['mfu'] for r in gpu):.1f}%, "
                     f"{max(r['max_memory_gib'] for r in gpu):.1f} GiB")
    parts.append(f"export: transformers loss {fwd['loss']:.3f}, logits "
                 f"{'x'.join(map(str, fwd['logits_shape']))}")
    res["key"] = "; ".join(parts)
