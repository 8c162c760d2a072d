"""Step 1 (setup): install the wheels, report versions and what can run here."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from gpu_proof_parts.processes import Proc, StepTimeout, _wait_for
from gpu_proof_parts.step_throughput import _throughput_line


def step_setup(proof, res: dict, deadline: float) -> None:
    details = res["details"]
    if proof.args.wheels:
        wheels = sorted(Path(proof.args.wheels).glob("*.whl"))
        details["wheels"] = [w.name for w in wheels]
        if wheels:
            site = proof.paths["site"]
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                   "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                   *map(str, wheels)]
            proc = proof.run(cmd, deadline, None, echo=True)
            if proc.timed_out:
                raise StepTimeout("pip install did not finish")
            if proc.p.returncode != 0:
                res["status"], res["key"] = "failed", f"pip install: {proc.last_error()}"
                return
            proof.env = proof._base_env(str(site))
            if proof.args.site_pth:
                details["site_pth"] = _write_pth(proof, site)
        else:
            details["wheels_note"] = f"no .whl files in {proof.args.wheels}: nothing installed"
    # One background child probes this machine (state/setup.json), then prepares every
    # input of the later steps on the CPU while the GPU tests run; the throughput worker
    # starts too (its imports overlap the GPU tests) and waits for a go.
    state = proof.paths["state"] / "setup.json"
    for name in ("setup.json", "prep_throughput.json", "prep_recipe.json",
                 "throughput_go.json", "throughput_rows.jsonl", "throughput_current.json",
                 "forward.json", "forward_request.json"):
        (proof.paths["state"] / name).unlink(missing_ok=True)
    proof.prep = Proc(proof.child("prep", proof.t0 + proof.args.budget), proof.env,
                     proof.out / "prep.log", echo="## ")
    proof.results["prep"] = {"started_s": round(time.time() - proof.t0, 1)}
    info = _wait_for(state, deadline, alive=proof.prep.alive)
    if info is None:
        if time.time() >= deadline:
            raise StepTimeout("the probe did not finish")
        res["status"], res["key"] = "failed", f"probe: {proof.prep.last_error()}"
        return
    details.update(info)
    ok_backends = [n for n, why in info["attention"].items() if why == "ok"]
    experts = info["experts"]
    experts_text = (experts if isinstance(experts, str) else
                    " ".join(n for n, why in experts.items() if why == "ok") or "none")
    v = info["versions"]
    res["key"] = (f"torch {v.get('torch')}, megatron-core {v.get('megatron-core')}, "
                  f"{info['device_name']}; attention: {' '.join(ok_backends)}; experts: "
                  f"{experts_text}")
    if info.get("error"):
        res["status"], res["key"] = "failed", info["error"]
        return
    res["status"] = "ok"
    proof.thr = Proc(proof.child("throughput", proof.t0 + proof.args.budget), proof.env,
                    proof.out / "throughput.log", on_line=lambda line: _throughput_line(proof, line))


def _write_pth(proof, site: Path) -> str:
    import sysconfig

    target = Path(sysconfig.get_paths()["purelib"]) / "gpu_proof_site.pth"
    try:
        target.write_text(f"{site}\n")
    except OSError as e:
        return f"could not write {target}: {e} (PYTHONPATH only)"
    return str(target)
