"""Child processes with their whole group stoppable, deadlines, and the results files."""

from __future__ import annotations

import collections
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from gpu_proof_parts.settings import R1_DATASET, R1_HF_NAME, R1_SAVE_NAME, REPO


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _free_gb(path: Path) -> float:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free / 1e9


def _paths(args) -> dict[str, Path]:
    """Every place the steps read and write (the workdir is resolved once by the orchestrator
    and passed to its children)."""
    work = Path(args.workdir)
    assets = work / "assets"
    hf = assets / "checkpoints" / R1_HF_NAME
    data_dir = assets / "data" / R1_DATASET
    seq = 256 if args.tiny else 16384
    return {"out": Path(args.out), "work": work, "state": work / "state", "site": work / "site",
            "throughput": work / "throughput", "assets": assets, "hf": hf,
            "converted": Path(f"{hf}_Megatron_TP1PP1"), "data_file": data_dir / f"{R1_DATASET}.jsonl",
            "data_prefix": data_dir / f"Tokenized-{R1_DATASET}-{R1_HF_NAME}-{seq}",
            "save": assets / "checkpoints" / R1_SAVE_NAME, "export": work / "export_hf",
            "tokenizer": work / "tokenizer"}


def _default_workdir(args) -> Path:
    if args.device == "cpu":
        return Path(args.out) / "work"
    candidates = [Path(p) for p in ("/dev/shm", "/tmp") if Path(p).is_dir()]
    best = max(candidates, key=_free_gb) if candidates else Path(args.out)
    return best / "gpu_proof_work"


def _wait_for(path: Path, deadline: float, alive: Callable[[], bool] = lambda: True,
              poll: float = 0.5) -> Optional[dict]:
    """The JSON at ``path`` once it exists; ``None`` at the deadline or when ``alive()`` says
    the process that writes it is gone."""
    while time.time() < deadline:
        data = _read_json(path)
        if data is not None:
            return data
        if not alive():
            return _read_json(path)
        time.sleep(poll)
    return None


class Proc:
    """A child process in its own session (so its whole group, torchrun's workers and
    pytest's too, can be stopped), its output appended to ``log`` and handed line by line to
    ``on_line``; ``wait`` stops it at the deadline."""

    def __init__(self, cmd: list[str], env: dict, log: Optional[Path],
                 on_line: Optional[Callable[[str], None]] = None, echo: bool | str = False):
        self.cmd, self.t0 = cmd, time.time()
        self.tail: collections.deque = collections.deque(maxlen=60)
        self.lines: collections.deque = collections.deque(maxlen=50000)  # for searching
        self.log = open(log, "a") if log is not None else None
        if self.log:
            self.log.write(f"\n$ {shlex.join(cmd)}\n")
            self.log.flush()
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, errors="replace", bufsize=1, cwd=REPO, env=env,
                                  start_new_session=True)
        self.on_line, self.echo = on_line, echo
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.timed_out = False

    def _read(self) -> None:
        for line in self.p.stdout:
            if self.log:
                self.log.write(line)
                self.log.flush()
            self.tail.append(line.rstrip("\n"))
            self.lines.append(line.rstrip("\n"))
            if self.echo is True or (self.echo and line.startswith(self.echo)):
                text = line.rstrip()
                text = text[len(self.echo):] if isinstance(self.echo, str) else text
                print(f"    | {text}", flush=True)
            if self.on_line:
                try:
                    self.on_line(line)
                except Exception as e:  # a bad line must not stop the reading
                    print(f"    (could not read a line: {e})", flush=True)

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to the child and every process below it: torchrun starts
        its workers in sessions of their own, so its process group alone would leave them
        running (on the GPU) after a step's budget."""
        if self.p.poll() is not None:
            return
        tree = [self.p.pid] + _descendants(self.p.pid)
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            for pid in tree:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                os.killpg(self.p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            end = time.time() + grace

            def running() -> bool:
                return self.p.poll() is None or any(_alive(pid) for pid in tree[1:])

            while time.time() < end and running():
                time.sleep(0.1)
            if not running():
                break

    def wait(self, deadline: float) -> int:
        try:
            rc = self.p.wait(max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.stop()
            rc = self.p.wait()
        self.reader.join(5)
        if self.log:
            self.log.write(f"[exit {rc}{', stopped at the step budget' if self.timed_out else ''}"
                           f" after {time.time() - self.t0:.1f}s]\n")
            self.log.close()
            self.log = None
        return rc

    @property
    def seconds(self) -> float:
        return time.time() - self.t0

    def last_error(self) -> str:
        """The most telling line of the output: a Python exception, an 'error:' line, else
        the last one."""
        lines = [line for line in self.tail if line.strip()]
        for line in reversed(lines):
            if re.match(r"^(\w+(\.\w+)*(Error|Exception)|error:|RuntimeError|AssertionError)",
                        line.strip()):
                return line.strip()[:400]
        return lines[-1].strip()[:400] if lines else "no output"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children[ppid].append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    except (OSError, IndexError):
        return False


class StepTimeout(Exception):
    pass


class Interrupted(BaseException):
    """SIGTERM/SIGINT to the orchestrator: stop the current step, still print the summary."""

def run_script(cmd: list[str], env: dict, in_process: bool) -> tuple[int, str]:
    """Run one of our shell scripts; ``(exit code, output)``.

    ``in_process`` (--tiny): the script runs with ``PYTHON=echo``, which prints the tool
    command it would run, and that tool's ``main(argv)`` runs in this process: the script's
    wiring (paths, environment, flags) is still checked, without starting Python, torch and
    transformers once more (CPU CI is short of time). tests/integration/bridge/test_roundtrip.py
    and tests/integration/data/test_data_preprocess_pipeline.py run these scripts for real.
    """
    import contextlib
    import importlib.util
    import io

    if not in_process:
        proc = subprocess.run(cmd, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
        return proc.returncode, proc.stdout
    echo = subprocess.run(cmd, env=dict(env, PYTHON="echo"), cwd=REPO, text=True,
                          capture_output=True)
    if echo.returncode != 0:
        return echo.returncode, echo.stdout + echo.stderr
    tool, *argv = shlex.split(echo.stdout.strip().splitlines()[-1])
    spec = importlib.util.spec_from_file_location(f"tool_{Path(tool).stem}", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = module.main(argv) or 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except Exception as e:
            import traceback

            traceback.print_exc()
            rc = 1
            print(f"{type(e).__name__}: {e}")
    return rc, f"(in this process: {Path(tool).name} {shlex.join(argv)})\n" + buf.getvalue()
