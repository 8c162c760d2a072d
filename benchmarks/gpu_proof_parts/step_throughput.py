"""Step 3 (throughput): each configuration's tokens/s, TFLOP/s, MFU and memory, then the profile."""

from __future__ import annotations

import json
import shutil
import signal
import time

from gpu_proof_parts.probes import _configs
from gpu_proof_parts.processes import _read_json, _write_json
from gpu_proof_parts.summary import _format_row


def _throughput_line(proof, line: str) -> None:
    if line.startswith("ROW "):
        row = json.loads(line[4:])
        again = row["key"] == "profile" and proof.results["profile"] is not None
        with proof.lock:
            if row["key"] == "profile":
                proof.results["profile"] = row  # a second time: with the trace's name
            else:
                proof.results["throughput"].append(row)
        proof.save()
        text = f"trace: {row.get('trace')}" if again else _format_row(row)
        print(f"    {text}", flush=True)
    elif line.startswith("## "):
        print(f"    {line[3:].rstrip()}", flush=True)


def step_throughput(proof, res: dict, deadline: float) -> None:
    state = proof.paths["state"]
    rows_file, current_file = state / "throughput_rows.jsonl", state / "throughput_current.json"
    rows: list[dict] = proof.results["throughput"]
    _write_json(state / "throughput_go.json", {"deadline": deadline})
    for attempt in range(4):  # a crashed worker is restarted for the configurations left
        if attempt == 0 and proof.thr is not None:
            proc, proof.thr = proof.thr, None  # started after setup, waiting for the go
            proof.wait(proc, deadline)
        else:
            current_file.unlink(missing_ok=True)
            proc = proof.run(proof.child("throughput", deadline), deadline, "throughput.log",
                            on_line=lambda line: _throughput_line(proof, line))
        if proc.p.returncode == 0 and not proc.timed_out:
            break
        started = _read_json(current_file)
        done = {r["key"] for r in rows} | ({"profile"} if proof.results["profile"] else set())
        if started and started["key"] not in done:
            rc = proc.p.returncode
            how = (f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}") \
                if not proc.timed_out else "stopped at the step budget"
            row = dict(started, status="timeout" if proc.timed_out else "crashed",
                       error=f"worker {how}; last: {proc.last_error()}"[:400],
                       wall_s=round(time.time() - started["t"], 1))
            with open(rows_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            _throughput_line(proof, "ROW " + json.dumps(row))
        if proc.timed_out:
            res["status"] = "timeout"
            break
        if started is None or started["key"] in done or deadline - time.time() < 20:
            res["status"], res["key"] = "failed", f"worker: {proc.last_error()}"
            break
    seen = {r["key"] for r in rows}
    for c in _configs(proof.args):  # the ones the worker never reached
        if c["key"] not in seen:
            _throughput_line(proof, "ROW " + json.dumps(dict(
                c, status="not run", wall_s=0.0, error="the step ended first")))
    ok = [r for r in rows if r["status"] == "ok"]
    if res["status"] == "not run":
        res["status"] = "ok" if ok else "failed"
    parts = []
    for seq in sorted({r["seq"] for r in ok}):
        best = max((r for r in ok if r["seq"] == seq), key=lambda r: r.get("tokens_per_s", 0))
        mfu = f" {100 * best['mfu']:.1f}% MFU" if best.get("mfu") is not None else ""
        mem = (f" {best['max_memory_gib']:.1f} GiB" if best.get("max_memory_gib") is not None
               else "")
        parts.append(f"{seq}: {best['backend']} {best['tokens_per_s']:,.0f} tok/s{mfu}{mem}")
    prof = proof.results["profile"]
    if prof and prof.get("status") == "ok":
        top = sorted(prof["shares"].items(), key=lambda kv: -kv[1])[:3]
        parts.append("profile " + ", ".join(f"{k} {v:.0f}%" for k, v in top))
    res["key"] = "; ".join([res["key"]] * bool(res["key"]) + parts) or \
        "no configuration ran"
    # The throughput models are not needed any more: room for the recipe's checkpoints.
    for sub in ("hf", "megatron"):
        shutil.rmtree(proof.paths["throughput"] / sub, ignore_errors=True)
