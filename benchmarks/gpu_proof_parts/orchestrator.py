"""The orchestrator: runs each step within its budget, keeps results as they come, prints the summary."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Optional

from gpu_proof_parts import step_gpu_tests
from gpu_proof_parts import step_kernels, step_moe
from gpu_proof_parts import step_recipe
from gpu_proof_parts import step_setup
from gpu_proof_parts import step_throughput
from gpu_proof_parts.processes import Interrupted, Proc, StepTimeout, _free_gb, _paths, _write_json
from gpu_proof_parts.settings import ENTRY, REPO, STEPS, TOTAL_BUDGET
from gpu_proof_parts.summary import summary_lines


# ================================================================================= orchestrator
class Proof:
    def __init__(self, args):
        self.args = args
        self.paths = _paths(args)
        self.out, self.work = self.paths["out"], self.paths["work"]
        self.lock = threading.Lock()
        self.t0 = time.time()
        self.current: Optional[Proc] = None
        self.prep: Optional[Proc] = None
        self.thr: Optional[Proc] = None  # the throughput worker, started after setup
        self.cuda = args.device == "cuda"
        self.results: dict[str, Any] = {
            "device": args.device, "tiny": args.tiny, "budget_s": args.budget,
            "out": str(self.out), "workdir": str(self.work),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}, "throughput": [],
            "profile": None}
        self.env = self._base_env()

    # ---------------------------------------------------------------- environment, children
    def _base_env(self, extra_path: Optional[str] = None) -> dict:
        env = dict(os.environ)
        parts = ([extra_path] if extra_path else []) + [str(REPO)] + \
            ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env.update(PYTHONPATH=os.pathsep.join(parts), PYTHON=sys.executable,
                   PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1")
        if not self.cuda:
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
        return env

    def child(self, step: str, deadline: float) -> list[str]:
        cmd = [sys.executable, str(ENTRY), "--run-step", step,
               "--device", self.args.device, "--out", str(self.out), "--workdir",
               str(self.work), "--deadline", f"{deadline:.1f}"]
        return cmd + (["--tiny"] if self.args.tiny else []) + \
            (["--trace"] if self.args.trace else [])

    def run(self, cmd: list[str], deadline: float, log: Optional[str], env=None,
            on_line=None, echo: bool | str = False) -> Proc:
        return self.wait(Proc(cmd, env or self.env, self.out / log if log else None, on_line,
                              echo), deadline)

    def wait(self, proc: Proc, deadline: float) -> Proc:
        self.current = proc
        try:
            proc.wait(deadline)
        except BaseException:  # Interrupted: the child's whole group goes too
            proc.stop()
            raise
        finally:
            self.current = None
        return proc

    def save(self) -> None:
        with self.lock:
            _write_json(self.out / "results.json", self.results)

    def say(self, text: str) -> None:
        print(f"[{time.time() - self.t0:6.1f}s] {text}", flush=True)

    # ---------------------------------------------------------------------------- the run
    def main(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.paths["state"].mkdir(parents=True, exist_ok=True)
        self.say(f"gpu proof on {self.args.device}{' (tiny)' if self.args.tiny else ''}: "
                 f"budget {self.args.budget:.0f}s, results in {self.out}, work in {self.work} "
                 f"({_free_gb(self.work):.0f} GB free)")
        steps = {"setup": step_setup.step_setup, "gpu_tests": step_gpu_tests.step_gpu_tests,
                 "throughput": step_throughput.step_throughput,
                 "recipe": step_recipe.step_recipe, "moe": step_moe.step_moe,
                 "kernels": step_kernels.step_kernels}

        def on_signal(signum, frame):
            raise Interrupted(signal.Signals(signum).name)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        stop_reason = None
        scale = self.args.budget / TOTAL_BUDGET  # --budget scales every step's budget
        try:
            for i, (key, title, budget) in enumerate(STEPS):
                budget = round(budget * scale, 1)
                res = {"title": title, "status": "not run", "seconds": 0.0, "budget_s": budget,
                       "key": "", "details": {}}
                self.results["steps"][key] = res
                if stop_reason:
                    res["key"] = stop_reason
                    continue
                later = scale * sum(b for _, _, b in STEPS[i + 1:])
                allowed = max(self.args.budget - (time.time() - self.t0) - later, 5.0)
                res["allowed_s"] = round(allowed, 1)
                start = time.time()
                self.say(f"{title}: up to {allowed:.0f}s (budget {budget}s)")
                try:
                    steps[key](self, res, start + allowed)
                except Interrupted as e:
                    res["status"], res["key"] = "timeout", f"interrupted ({e})"
                    stop_reason = f"not run: interrupted ({e})"
                except StepTimeout as e:
                    res["status"], res["key"] = "timeout", str(e) or res["key"]
                except Exception as e:  # a harness bug: say it, keep going
                    import traceback

                    res["status"] = "failed"
                    res["key"] = f"{type(e).__name__}: {e}"[:400]
                    res["details"]["traceback"] = traceback.format_exc()[-4000:]
                res["seconds"] = round(time.time() - start, 1)
                self.save()
                self.say(f"{title}: {res['status']} ({res['seconds']:.1f}s) {res['key']}")
                if key == "setup" and res["status"] != "ok":
                    stop_reason = "not run: setup did not pass"
        except Interrupted as e:
            stop_reason = f"interrupted ({e})"
        finally:
            for proc in (self.current, self.prep, self.thr):
                if proc is not None:
                    proc.stop()
            for s, h in previous.items():
                signal.signal(s, h)
        self.results["total_s"] = round(time.time() - self.t0, 1)
        self.results["summary"] = summary_lines(self)
        self.save()
        print("\n".join(self.results["summary"]), flush=True)
        ok = all(s["status"] in ("ok", "skipped") for s in self.results["steps"].values())
        return 0 if ok else 1
