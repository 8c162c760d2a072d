"""The summary table printed last."""

from __future__ import annotations

import time

from gpu_proof_parts.processes import _read_json
from gpu_proof_parts.settings import STEPS


def summary_lines(proof) -> list[str]:
    device = proof.results["steps"].get("setup", {}).get("details", {}).get(
        "device_name", proof.args.device)
    lines = ["", f"Summary (gpu_proof on {device}{', tiny' if proof.args.tiny else ''}; "
                 f"budget {proof.args.budget:.0f}s, took {time.time() - proof.t0:.0f}s)",
             f"  {'step':<26} {'status':<9} {'seconds':>8}  key numbers"]
    for i, (key, title, budget) in enumerate(STEPS, 1):
        s = proof.results["steps"].get(key, {"status": "not run", "seconds": 0, "key": ""})
        lines.append(f"  {f'{i} {title}':<26} {s['status']:<9} {s['seconds']:>8.1f}  "
                     f"{s['key']}")
        if key == "throughput":
            for r in proof.results["throughput"]:
                lines.append(f"    {_format_row(r)}")
            prof = proof.results["profile"]
            if prof:
                lines.append(f"    {_format_row(prof)}")
    marker = proof.paths["state"] / "prep_recipe.json"
    prep = _read_json(proof.paths["state"] / "prep_throughput.json") or {}
    prep_r = _read_json(marker) or {}
    if prep or prep_r:
        ready = f"ready at {marker.stat().st_mtime - proof.t0:.0f}s" if prep_r else "not ready"
        lines.append(f"  {'  (inputs, in background)':<26} "
                     f"{(prep_r or prep).get('status', '?'):<9} "
                     f"{prep.get('seconds', 0) + prep_r.get('seconds', 0):>8.1f}  "
                     f"throughput model + data; recipe model, tokenizer, "
                     f"{prep_r.get('conversations', '?')} conversations, convert, tokenize "
                     f"({ready})")
    lines.append(f"  {'total':<26} {'':<9} {time.time() - proof.t0:>8.1f}")
    return lines


def _format_row(r: dict) -> str:
    if r["key"] == "profile":
        head = f"profile ({r.get('config') or 'best 4k'})"
        if r["status"] != "ok":
            return f"{head:<26} {r['status']:<9} {r.get('wall_s', 0):>8.1f}  {r.get('error', '')}"
        shares = " | ".join(f"{k} {v:.0f}%" for k, v in r["shares"].items() if v >= 0.5)
        return (f"{head:<26} {'ok':<9} {r.get('wall_s', 0):>8.1f}  {shares} "
                f"(kernels {r.get('busy_pct', 0):.0f}% of wall)")
    head = f"{r['seq']} {r['backend']} {r['recompute']}"
    if r["status"] != "ok":
        return f"{head:<26} {r['status']:<9} {r.get('wall_s', 0):>8.1f}  {r.get('error', '')}"
    cells = [f"{r['tokens_per_s']:,.0f} tok/s", f"{r['ms_per_iter']:.0f} ms/it"]
    if r.get("tflops_per_gpu") is not None:
        cells.append(f"{r['tflops_per_gpu']:.1f} TFLOP/s")
    if r.get("mfu") is not None:
        cells.append(f"MFU {100 * r['mfu']:.1f}%")
    if r.get("max_memory_gib") is not None:
        cells.append(f"{r['max_memory_gib']:.1f} GiB")
    cells.append(f"first it {r.get('first_iter_s', 0):.1f}s, build {r.get('setup_s', 0):.1f}s, "
                 f"gbs {r['gbs']}")
    return f"{head:<26} {'ok':<9} {r.get('wall_s', 0):>8.1f}  " + ", ".join(cells)
