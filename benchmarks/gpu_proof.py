#!/usr/bin/env python3
"""The GPU proof (issue 21) in one command: setup, the GPU tests, throughput against the goals,
the 1.5B / 16k recipe end to end and the MoE layer micro-benchmark, in at most 8 minutes on one
H100/H200. Results are written under ``--out`` as they come (a timeout keeps the earlier
numbers); one summary table is printed last.

  bash benchmarks/gpu_proof.sh                  # the GPU machine (wheels from gpu_proof_wheels.sh)
  python benchmarks/gpu_proof.py --device cuda --wheels .whl --out OUT
  python benchmarks/gpu_proof.py --device cpu --tiny --out DIR      # dry run of every step on CPU

Steps and their budgets (seconds; a step's unused seconds pass on to the later ones, the whole
run stays within ``--budget``, 480 by default, which scales every budget). A step that reaches
its budget is stopped (its whole process tree) and reported "timeout"; the next one starts.
Estimates are for one H200 and are estimates: this script has not run on a GPU yet.

=========== ====== ============================================================= ===========
step        budget what                                                          estimate
=========== ====== ============================================================= ===========
setup           30 install ``--wheels``; versions; attention backends and           ~10 s
                   experts implementations that can run here
gpu tests      100 ``pytest -x -q tests/gpu`` (4 xdist workers: the parity tests    ~60 s
                   launch torchrun per case, ~15 s each)
throughput     170 5 configurations x (3 warm-up + 5 measured iterations), then     ~170 s
                   a profile of 2 iterations of the best 4k configuration
recipe         150 R1 recipe: train 4 iterations (saves 2, 4), re-run to 6         ~140 s
                   (resumes from 4), merge_and_export.sh, a transformers forward
moe             30 ``bench_moe_gpu.py --parts layer`` if the MoE work has landed    ~20 s
=========== ====== ============================================================= ===========

One background process does the setup probe, then prepares every input on the CPU while the
GPU tests run (~70 s, none of it on the GPU): a random Qwen2-1.5B-shaped model converted to
Megatron plus long-tailed packed data for the throughput runs, and for the recipe a random
R1-Distill-Qwen-1.5B-shaped model (``bench_train_gpu.R1_DISTILL_QWEN_1_5B``) with a BPE
tokenizer trained in-process (``tiny_tokenizer``'s R1-like chat template; the vocabulary is the
model's), ``convert_deepseek_r1_to_megatron.sh 1.5B 1 1``, 300 synthetic reasoning
conversations with ``<think>`` blocks (long-tailed, none over 90 % of 16k tokens) and
``tokenize_dataset.sh ... 16384``. It then waits, torch and transformers imported, to export
and read back the recipe's result at the end.

Throughput (Qwen2-1.5B shape, bf16, one GPU, distributed optimizer, packed rows of
``bench_train_gpu``'s long-tailed documents: log-normal, median ~2k tokens at 16k, scaled to the
row at 4k): all configurations run in ONE process (one import of megatron-core, one process
group; a Trainer per configuration, as tests/integration/training/resume_worker.py does)
instead of one torchrun launch each (~15 s of imports and start-up saved per configuration).

- ``varlen`` 4096/none, ``varlen`` 16384/selective, ``sdpa`` 4096/none, ``flex`` 4096/none,
  the profile, ``flex`` 16384/selective, in that order; global batch 8 rows at 4k and 2 at 16k
  (32,768 tokens a step either way, ~9.8 GFLOP a token: ~0.8 s a step at 40 % MFU, ~1.3 s at
  25 %). The worker starts after setup and imports megatron-core while the GPU tests run.
- A configuration costs ~6-8 s to build (load 3.6 GB, DDP, optimizer) + 8 steps ~10 s;
  ``flex`` adds its first-use compile (``torch.compile`` of ``flex_attention`` forward and
  backward plus ``create_block_mask``: ~30-60 s, once per sequence length, ``dynamic=False``).
  Before each configuration the worker checks that the time left covers its estimate (plus
  ~45 s kept for the profile until it has run); if not it is reported "skipped: time budget"
  (flex at 16k, last, is the likely one).
- Numbers: medians of the measured iterations from the Trainer's own records (tokens/s of the
  rows, TFLOP/s and MFU over the real documents, ``megatron.sft.training.metrics``, peak 989
  TFLOP/s on H100/H200), peak memory (``max_memory_allocated``, reset per configuration). An
  out-of-memory configuration is reported as OOM; a crashed worker (say a CUDA error) is
  reported for its configuration and restarted for the rest.
- The profile (``torch.profiler``, 1 warm-up + 2 iterations of the fastest 4k configuration)
  is summarised by category; see :data:`PROFILE_RULES` for how CUDA kernels are classified
  (``top`` in results.json lists the 40 biggest kernels with their category, to check the
  rules). "kernels N % of wall" is kernel time over the 2 iterations' wall time, profiler
  overhead included. ``--trace`` keeps the Chrome trace (gzipped, if under 15 MB and time is
  left once the 16k flex run is done).

The recipe (R1-Distill-Qwen-1.5B shape with the tokenizer's vocabulary, ~1.33 B parameters):
``GPUS_PER_NODE=1 TRAIN_ITERS=4 SAVE_INTERVAL=2 GBS=4 KEEP_LAST=1 bash
scripts/sft/SFT_Hybrid_R1_1.5B_OpenThoughts_1M.sh train``, then ``TRAIN_ITERS=6``. A step is 4
rows of 16,384 tokens with the recipe's full recompute (~2.5 s); a checkpoint with the
distributed optimizer's fp32 state is ~14 bytes a parameter, ~18.6 GB (~20 s to write and hash
on tmpfs), so the run writes three and reads one: most of the recipe's time is checkpoint I/O.
``KEEP_LAST=1`` keeps two on disk at most (~37 GB); the big files live in ``--workdir``
(default on CUDA: ``/dev/shm`` or ``/tmp``, whichever has more room), never under ``--out``.

``--tiny`` (CPU dry run, ~35 s on 2 idle cores): a 2-layer hidden-64 model for both, 40
conversations, sequence 256, 2 warm-up + 2 measured iterations; varlen/flex, the GPU tests and
the MoE benchmark (whose flags are checked) report "skipped: no CUDA". The convert, tokenize and
export scripts run with ``PYTHON=echo`` and their tools in-process with the arguments the
scripts built (:func:`run_script`); the two training runs are real launches.

Files under ``--out`` (the run tool returns at most 8): results.json, prep.log,
gpu_tests.log, throughput.log, recipe.log, moe.log, trace.json.gz, and the console log the
command tees there.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

#: (key, title, budget in seconds); the total is the default --budget
STEPS = (("setup", "setup", 30), ("gpu_tests", "gpu tests", 100),
         ("throughput", "throughput", 170), ("recipe", "recipe", 150), ("moe", "moe", 30))
TOTAL_BUDGET = sum(b for _, _, b in STEPS)

#: throughput configurations (full-size sequence length, attention backend, recompute), in the
#: order they run
CONFIGS = ((4096, "varlen", "none"), (16384, "varlen", "selective"), (4096, "sdpa", "none"),
           (4096, "flex", "none"), (16384, "flex", "selective"))
GLOBAL_BATCH = {4096: 8, 16384: 2}
TINY_SEQ = {4096: 256, 16384: 512}
TINY_GLOBAL_BATCH = {256: 2, 512: 1}

#: the tiny model of --tiny, for the throughput runs and (with the tokenizer's vocabulary)
#: the recipe
TINY_QWEN2 = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0)

#: the names the recipe scripts expect (their defaults: nothing to override but ASSETS_DIR)
R1_HF_NAME = "deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B"
R1_DATASET = "Vinnnf-Hybrid-OpenThoughts2-1M-1.5B"
R1_SAVE_NAME = "SFT_Hybrid_R1_1.5B"

CATEGORIES = ("attention", "GEMMs", "norm/RoPE/SwiGLU elementwise", "loss over the vocabulary",
              "optimizer", "communication", "data", "other")

#: How the profile's time is classified. Each CUDA kernel is described by one line of text: its
#: name, then the names of the CPU ops it was launched from (innermost first), then, for a
#: kernel of the backward pass, the labels of the forward op that made its autograd node (same
#: sequence number). The profiling run labels four regions of our own code with
#: ``record_function``: ``sft::data`` (building and copying the micro-batches),
#: ``sft::attention`` (the core-attention kernel call, so flex's compiled Triton kernels and its
#: block mask count as attention), ``sft::loss`` (the vocabulary-parallel cross-entropy, with
#: the fp32 cast of the logits) and ``sft::optimizer`` (zeroing the gradient buffers, the
#: optimizer step with its gradient norm, clipping and parameter copies, the LR scheduler).
#: The first rule that matches wins; ``name`` rules look at the kernel name only. The LM head's
#: matmul is a GEMM, not loss. On CPU (--tiny) the same rules classify each op's self CPU time.
PROFILE_RULES: tuple[tuple[str, str, str], ...] = (
    ("communication", "name", r"nccl|all_?reduce|all_?gather|reduce_?scatter|sendrecv"),
    ("data", "name", r"memcpy htod|memcpy h2d"),
    ("optimizer", "text", r"sft::optimizer|optimizer\.step|multi_tensor|adam"),
    ("data", "text", r"sft::data"),
    ("loss over the vocabulary", "text",
     r"sft::loss|vocabparallelcrossentropy|cross_entropy|nll_loss"),
    ("attention", "text", r"sft::attention|flash|fmha|sdpa|scaled_dot_product|attention|attn|"
                          r"flex|compiledfunction"),  # flex is the one compiled thing here
    ("communication", "text", r"nccl|c10d::|all_?reduce|all_?gather|reduce_?scatter|gloo"),
    ("GEMMs", "text", r"gemm|gemv|nvjet|cutlass|xmma|cublas|splitk|wgmma|"
                      r"aten::(mm|addmm|bmm|baddbmm|matmul|linear)\b|linearwithgrad"),
    ("other", "name", r"^memset|^memcpy"),
    ("norm/RoPE/SwiGLU elementwise", "text",
     r"elementwise|reduce_kernel|norm|silu|swiglu|rotary|rope|triton|at::native|aten::"),
)


def classify(kernel: str, text: str) -> str:
    """The category of a kernel (or CPU op) from its name and its description line.

    >>> classify("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_NNT", "aten::mm <- aten::linear")
    'GEMMs'
    >>> classify("triton_tem_fused_0", "CompiledFunction <- sft::attention")
    'attention'
    >>> classify("void at::native::vectorized_elementwise_kernel<4>", "aten::mul")
    'norm/RoPE/SwiGLU elementwise'
    >>> classify("Memcpy HtoD (Pageable -> Device)", "aten::copy_ <- sft::data")
    'data'
    """
    for category, field, pattern in PROFILE_RULES:
        if re.search(pattern, (kernel if field == "name" else f"{kernel} <- {text}").lower()):
            return category
    return "other"


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: the real proof; cpu: a dry run (GPU-only steps are skipped)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny models, 40 conversations, sequence 256, 2+2 iterations: checks "
                        "the harness, measures nothing")
    p.add_argument("--out", default=str(REPO / "runs" / "gpu_proof"),
                   help="results (results.json, the steps' logs, trace.json.gz) are written "
                        "here as they come; keep it small: big files go to --workdir")
    p.add_argument("--workdir", default=None,
                   help="models, data and checkpoints (~50 GB on CUDA; default: on CUDA the "
                        "roomier of /dev/shm and /tmp, on CPU OUT/work)")
    p.add_argument("--wheels", default=None,
                   help="folder of .whl files to install first (pip --no-index --no-deps "
                        "--target WORKDIR/site, put on PYTHONPATH), e.g. the .whl/ that "
                        "benchmarks/gpu_proof_wheels.sh fills")
    p.add_argument("--site-pth", action="store_true",
                   help="also write a .pth file naming the --wheels target into this "
                        "interpreter's site-packages, so subprocesses that reset PYTHONPATH "
                        "(some test helpers do) find the wheels too: for a throwaway machine")
    p.add_argument("--budget", type=float, default=TOTAL_BUDGET,
                   help=f"seconds for the whole run (default {TOTAL_BUDGET}); every step's "
                        "budget scales with it, and a step passes its unused seconds on")
    p.add_argument("--trace", action="store_true",
                   help="also write the profile's Chrome trace to OUT/trace.json.gz (when it "
                        "fits 15 MB and the throughput budget)")
    p.add_argument("--gpu-test-workers", type=int, default=4,
                   help="pytest-xdist workers for the GPU tests (default 4; 1 = no xdist)")
    p.add_argument("--run-step", choices=["prep", "throughput", "forward"],
                   default=None,
                   help="internal: run one part in this process (the orchestrator starts "
                        "itself with it, so that every step can be stopped at its budget)")
    p.add_argument("--deadline", type=float, default=None,
                   help="internal: wall-clock time (time.time()) the --run-step must end by")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# -------------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-step", step,
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
        steps = {"setup": self.step_setup, "gpu_tests": self.step_gpu_tests,
                 "throughput": self.step_throughput, "recipe": self.step_recipe,
                 "moe": self.step_moe}

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
                    steps[key](res, start + allowed)
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
        self.results["summary"] = self.summary_lines()
        self.save()
        print("\n".join(self.results["summary"]), flush=True)
        ok = all(s["status"] in ("ok", "skipped") for s in self.results["steps"].values())
        return 0 if ok else 1

    # -------------------------------------------------------------------------- 1. setup
    def step_setup(self, res: dict, deadline: float) -> None:
        details = res["details"]
        if self.args.wheels:
            wheels = sorted(Path(self.args.wheels).glob("*.whl"))
            details["wheels"] = [w.name for w in wheels]
            if wheels:
                site = self.paths["site"]
                cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                       "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                       *map(str, wheels)]
                proc = self.run(cmd, deadline, None, echo=True)
                if proc.timed_out:
                    raise StepTimeout("pip install did not finish")
                if proc.p.returncode != 0:
                    res["status"], res["key"] = "failed", f"pip install: {proc.last_error()}"
                    return
                self.env = self._base_env(str(site))
                if self.args.site_pth:
                    details["site_pth"] = self._write_pth(site)
            else:
                details["wheels_note"] = f"no .whl files in {self.args.wheels}: nothing installed"
        # One background child probes this machine (state/setup.json), then prepares every
        # input of the later steps on the CPU while the GPU tests run; the throughput worker
        # starts too (its imports overlap the GPU tests) and waits for a go.
        state = self.paths["state"] / "setup.json"
        for name in ("setup.json", "prep_throughput.json", "prep_recipe.json",
                     "throughput_go.json", "throughput_rows.jsonl", "throughput_current.json",
                     "forward.json", "forward_request.json"):
            (self.paths["state"] / name).unlink(missing_ok=True)
        self.prep = Proc(self.child("prep", self.t0 + self.args.budget), self.env,
                         self.out / "prep.log", echo="## ")
        self.results["prep"] = {"started_s": round(time.time() - self.t0, 1)}
        info = _wait_for(state, deadline, alive=self.prep.alive)
        if info is None:
            if time.time() >= deadline:
                raise StepTimeout("the probe did not finish")
            res["status"], res["key"] = "failed", f"probe: {self.prep.last_error()}"
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
        self.thr = Proc(self.child("throughput", self.t0 + self.args.budget), self.env,
                        self.out / "throughput.log", on_line=self._throughput_line)

    def _write_pth(self, site: Path) -> str:
        import sysconfig

        target = Path(sysconfig.get_paths()["purelib"]) / "gpu_proof_site.pth"
        try:
            target.write_text(f"{site}\n")
        except OSError as e:
            return f"could not write {target}: {e} (PYTHONPATH only)"
        return str(target)

    # ---------------------------------------------------------------------- 2. GPU tests
    def step_gpu_tests(self, res: dict, deadline: float) -> None:
        if not self.cuda:
            res["status"], res["key"] = "skipped", "skipped: no CUDA"
            return
        versions = self.results["steps"]["setup"]["details"].get("versions", {})
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfEs", "tests/gpu"]
        workers = self.args.gpu_test_workers
        if workers > 1 and versions.get("pytest-xdist", "missing") != "missing":
            cmd += ["-n", str(workers), "--dist", "loadgroup"]
        proc = self.run(cmd, deadline, "gpu_tests.log")
        rc = proc.p.returncode
        summary = next((line for line in reversed(proc.tail)
                        if re.search(r"\d+ (passed|failed|error|skipped)|no tests ran", line)), "")
        summary = summary.strip("= ").strip()
        res["details"]["summary_line"] = summary
        res["details"]["failures"] = [line for line in proc.tail
                                      if line.startswith(("FAILED", "ERROR"))][:10]
        if proc.timed_out:
            res["status"] = "timeout"
            res["key"] = f"stopped at {res.get('allowed_s')}s; last: {proc.last_error()}"
        elif rc == 0 and not re.search(r"\d+ passed", summary):
            res["status"], res["key"] = "failed", f"no GPU test passed: {summary}"
        elif rc == 0:
            res["status"], res["key"] = "ok", summary
        else:
            res["status"] = "failed"
            res["key"] = "; ".join(res["details"]["failures"][:2]) or summary or \
                proc.last_error()

    # --------------------------------------------------------------------- 3. throughput
    def _throughput_line(self, line: str) -> None:
        if line.startswith("ROW "):
            row = json.loads(line[4:])
            again = row["key"] == "profile" and self.results["profile"] is not None
            with self.lock:
                if row["key"] == "profile":
                    self.results["profile"] = row  # a second time: with the trace's name
                else:
                    self.results["throughput"].append(row)
            self.save()
            text = f"trace: {row.get('trace')}" if again else _format_row(row)
            print(f"    {text}", flush=True)
        elif line.startswith("## "):
            print(f"    {line[3:].rstrip()}", flush=True)

    def step_throughput(self, res: dict, deadline: float) -> None:
        state = self.paths["state"]
        rows_file, current_file = state / "throughput_rows.jsonl", state / "throughput_current.json"
        rows: list[dict] = self.results["throughput"]
        _write_json(state / "throughput_go.json", {"deadline": deadline})
        for attempt in range(4):  # a crashed worker is restarted for the configurations left
            if attempt == 0 and self.thr is not None:
                proc, self.thr = self.thr, None  # started after setup, waiting for the go
                self.wait(proc, deadline)
            else:
                current_file.unlink(missing_ok=True)
                proc = self.run(self.child("throughput", deadline), deadline, "throughput.log",
                                on_line=self._throughput_line)
            if proc.p.returncode == 0 and not proc.timed_out:
                break
            started = _read_json(current_file)
            done = {r["key"] for r in rows} | ({"profile"} if self.results["profile"] else set())
            if started and started["key"] not in done:
                rc = proc.p.returncode
                how = (f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}") \
                    if not proc.timed_out else "stopped at the step budget"
                row = dict(started, status="timeout" if proc.timed_out else "crashed",
                           error=f"worker {how}; last: {proc.last_error()}"[:400],
                           wall_s=round(time.time() - started["t"], 1))
                with open(rows_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
                self._throughput_line("ROW " + json.dumps(row))
            if proc.timed_out:
                res["status"] = "timeout"
                break
            if started is None or started["key"] in done or deadline - time.time() < 20:
                res["status"], res["key"] = "failed", f"worker: {proc.last_error()}"
                break
        seen = {r["key"] for r in rows}
        for c in _configs(self.args):  # the ones the worker never reached
            if c["key"] not in seen:
                self._throughput_line("ROW " + json.dumps(dict(
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
        prof = self.results["profile"]
        if prof and prof.get("status") == "ok":
            top = sorted(prof["shares"].items(), key=lambda kv: -kv[1])[:3]
            parts.append("profile " + ", ".join(f"{k} {v:.0f}%" for k, v in top))
        res["key"] = "; ".join([res["key"]] * bool(res["key"]) + parts) or \
            "no configuration ran"
        # The throughput models are not needed any more: room for the recipe's checkpoints.
        for sub in ("hf", "megatron"):
            shutil.rmtree(self.paths["throughput"] / sub, ignore_errors=True)

    # ------------------------------------------------------------------------- 4. recipe
    def step_recipe(self, res: dict, deadline: float) -> None:
        p, details = self.paths, res["details"]
        marker = p["state"] / "prep_recipe.json"
        prep = _wait_for(marker, deadline, alive=lambda: self.prep is not None and
                         self.prep.alive())
        if prep is None:
            if time.time() >= deadline:
                raise StepTimeout("the inputs were not ready (prep.log)")
            tail = self.prep.last_error() if self.prep else "not started"
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
        env = dict(self.env, ASSETS_DIR=str(p["assets"]), GPUS_PER_NODE="1", GBS="4",
                   SAVE_INTERVAL="2", KEEP_LAST="1")
        if self.args.tiny:
            env["MAX_LEN"] = env["SEQ_LEN"] = "256"  # the recipe names its data by MAX_LEN
        recipe = ["bash", str(REPO / "scripts/sft/SFT_Hybrid_R1_1.5B_OpenThoughts_1M.sh"),
                  "train"]
        log_json = p["save"] / "train_log.jsonl"
        for iters, expect in ((4, None), (6, 4)):
            env_run = dict(env, TRAIN_ITERS=str(iters), MASTER_PORT=str(_free_port()))
            proc = self.run(recipe, deadline, "recipe.log", env=env_run)
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
        if self.prep is not None and self.prep.alive():  # it waits for this, imports done
            _write_json(p["state"] / "forward_request.json", {"t": time.time()})
            fwd = _wait_for(fwd_json, deadline, alive=self.prep.alive)
            if fwd is None and time.time() >= deadline:
                self.prep.stop()
                raise StepTimeout("merge_and_export.sh + the transformers forward did not "
                                  "finish")
            why = "" if fwd is not None else f"(background process: {self.prep.last_error()})"
        if fwd is None:  # no background process to ask: a process of its own
            proc = self.run(self.child("forward", deadline), deadline, "recipe.log")
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
        if self.cuda:  # the goal: the log shows loss, tokens/s, MFU and memory
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

    # ---------------------------------------------------------------------------- 5. MoE
    def step_moe(self, res: dict, deadline: float) -> None:
        bench = REPO / "benchmarks" / "bench_moe_gpu.py"
        if not bench.exists():
            res["status"], res["key"] = "skipped", "skipped: MoE not in this build"
            return
        out = self.paths["state"] / "moe.json"
        out.unlink(missing_ok=True)
        flags = ["--parts", "layer", "--output-json", str(out)]
        if not self.cuda:
            # A GPU measurement (it has its own CPU dry-run test): here only check that it
            # takes these flags, without the seconds of a megatron-core import.
            import importlib.util

            spec = importlib.util.spec_from_file_location("bench_moe_gpu", bench)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
                module.parse_args(flags + ["--device", "cpu"])
            except SystemExit:
                res["status"] = "failed"
                res["key"] = f"bench_moe_gpu.py does not take {' '.join(flags[:2])} --output-json"
                return
            res["status"] = "skipped"
            res["key"] = f"skipped: no CUDA (bench_moe_gpu.py takes {' '.join(flags[:2])})"
            return
        proc = self.run([sys.executable, str(bench)] + flags, deadline, "moe.log")
        data = _read_json(out)
        if proc.timed_out:
            raise StepTimeout("bench_moe_gpu.py did not finish")
        if proc.p.returncode != 0 or data is None:
            res["status"], res["key"] = "failed", f"bench_moe_gpu.py: {proc.last_error()}"
            return
        layers = [r for r in data.get("results", []) if r.get("part") == "layer"]
        res["details"]["results"] = layers
        res["status"] = "ok"
        res["key"] = "; ".join(
            f"{r.get('module', '?')} {r.get('ms', float('nan')):.2f} ms"
            + (f" ({r['vs_dense']:.2f}x dense)" if r.get("vs_dense") is not None else "")
            for r in layers) or "no layer results"

    # ------------------------------------------------------------------------- summary
    def summary_lines(self) -> list[str]:
        device = self.results["steps"].get("setup", {}).get("details", {}).get(
            "device_name", self.args.device)
        lines = ["", f"Summary (gpu_proof on {device}{', tiny' if self.args.tiny else ''}; "
                     f"budget {self.args.budget:.0f}s, took {time.time() - self.t0:.0f}s)",
                 f"  {'step':<26} {'status':<9} {'seconds':>8}  key numbers"]
        for i, (key, title, budget) in enumerate(STEPS, 1):
            s = self.results["steps"].get(key, {"status": "not run", "seconds": 0, "key": ""})
            lines.append(f"  {f'{i} {title}':<26} {s['status']:<9} {s['seconds']:>8.1f}  "
                         f"{s['key']}")
            if key == "throughput":
                for r in self.results["throughput"]:
                    lines.append(f"    {_format_row(r)}")
                prof = self.results["profile"]
                if prof:
                    lines.append(f"    {_format_row(prof)}")
        marker = self.paths["state"] / "prep_recipe.json"
        prep = _read_json(self.paths["state"] / "prep_throughput.json") or {}
        prep_r = _read_json(marker) or {}
        if prep or prep_r:
            ready = f"ready at {marker.stat().st_mtime - self.t0:.0f}s" if prep_r else "not ready"
            lines.append(f"  {'  (inputs, in background)':<26} "
                         f"{(prep_r or prep).get('status', '?'):<9} "
                         f"{prep.get('seconds', 0) + prep_r.get('seconds', 0):>8.1f}  "
                         f"throughput model + data; recipe model, tokenizer, "
                         f"{prep_r.get('conversations', '?')} conversations, convert, tokenize "
                         f"({ready})")
        lines.append(f"  {'total':<26} {'':<9} {time.time() - self.t0:>8.1f}")
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


# ====================================================================================== children
def probe(args) -> dict:
    """Versions, device, and which attention backends / experts implementations run here
    (state/setup.json; printed as '## ' lines, which the orchestrator echoes)."""
    import importlib.metadata as md
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                            "versions": {}, "error": None}
    for name in ("torch", "megatron-core", "transformers", "safetensors", "tokenizers", "peft",
                 "pyarrow", "triton", "einops", "numpy", "pytest", "pytest-xdist",
                 "transformer-engine", "transformer_engine"):
        try:
            info["versions"][name] = md.version(name)
        except md.PackageNotFoundError:
            info["versions"][name] = "missing"
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=torch.cuda.get_device_name(0),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
    else:
        info["device_name"] = "cpu"
        if args.device == "cuda":
            info["error"] = "no CUDA device (torch.cuda.is_available() is False): use --device cpu"
    import importlib.util

    found = importlib.util.find_spec("megatron.core")  # located, not imported (seconds)
    if found is None:
        info["error"] = info["error"] or "megatron-core is not installed here (pass --wheels)"
    else:
        info["megatron_core_path"] = str(Path(found.origin).parent)
    from megatron.sft.model.attention import attention_backends
    from megatron.sft.model.layer_impl import resolve_layer_impl, transformer_engine_available

    info["transformer_engine"] = transformer_engine_available()
    info["attention"] = {}
    for spec in attention_backends():
        impl = "transformer_engine" if spec.needs_te_layers else "auto"
        try:
            resolve_layer_impl(impl, spec.name, args.device)
            info["attention"][spec.name] = "ok"
        except Exception as e:  # LayerImplError: the reason, with the alternative
            info["attention"][spec.name] = str(e).splitlines()[0][:200]
    try:
        from megatron.sft.model.moe import experts as experts_mod
    except ImportError:
        info["experts"] = "MoE not available in this build"
    else:
        linear = "te" if info["transformer_engine"] and args.device == "cuda" else "local"
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        info["experts"] = {}
        for choice in getattr(experts_mod, "MOE_EXPERTS_IMPLS", ()):
            if choice == "auto":
                continue
            try:
                experts_mod.resolve_experts_impl(choice, linear, args.device, dtype)
                info["experts"][choice] = "ok"
            except Exception as e:
                info["experts"][choice] = str(e).splitlines()[0][:200]
    work = Path(args.workdir)
    info["free_gb"] = {str(p): round(_free_gb(p), 1) for p in (work, Path("/dev/shm"),
                                                               Path("/tmp")) if p.exists()}
    info["cpus"] = os.cpu_count()
    _write_json(Path(args.workdir) / "state" / "setup.json", info)
    v = info["versions"]
    print(f"## python {info['python']} ({sys.executable}); torch {v['torch']} (CUDA "
          f"{info['torch_cuda']}); megatron-core {v['megatron-core']} "
          f"({info.get('megatron_core_path', 'not found')}); transformers {v['transformers']}; "
          f"safetensors {v['safetensors']}; tokenizers {v['tokenizers']}; peft {v['peft']}; "
          f"pyarrow {v['pyarrow']}; triton {v['triton']}; Transformer Engine "
          f"{'yes' if info['transformer_engine'] else 'no'}", flush=True)
    print(f"## device: {info['device_name']}"
          + (f" (sm {info['capability']}, {info['gpu_memory_gib']} GiB)"
             if info.get("capability") else ""), flush=True)
    for name, why in info["attention"].items():
        print(f"## attention {name:<7} {why}", flush=True)
    if isinstance(info["experts"], str):
        print(f"## experts: {info['experts']}", flush=True)
    else:
        for name, why in info["experts"].items():
            print(f"## experts {name:<10} {why}", flush=True)
    print(f"## free space (GB): {info['free_gb']}; {info['cpus']} CPUs", flush=True)
    return info


def _runnable(backend: str, device: str) -> Optional[str]:
    """``None`` when ``backend`` runs on ``device``, else why not."""
    from megatron.sft.model.attention import get_attention_backend

    return get_attention_backend(backend).check("local", device)


def _configs(args) -> list[dict]:
    out = []
    for seq, backend, recompute in CONFIGS:
        s = TINY_SEQ[seq] if args.tiny else seq
        gbs = TINY_GLOBAL_BATCH[s] if args.tiny else GLOBAL_BATCH[seq]
        out.append({"key": f"{s} {backend} {recompute}", "seq": s, "backend": backend,
                    "recompute": recompute, "gbs": gbs})
    return out


# -------------------------------------------------------------------------- synthetic recipe data
_SYLLABLES = ("ka", "ri", "to", "men", "sa", "lo", "vi", "der", "an", "el", "qu", "or", "is", "un",
              "pe", "ta", "mo", "ner", "si", "gal", "bo", "ex", "tri", "fu", "ly", "zo", "ham", "wi")


def synthetic_reasoning_conversations(count: int, max_tokens: int, seed: int = 0
                                      ) -> list[dict]:
    """``count`` conversations in the ``messages`` format, each assistant turn a ``<think>``
    block (the reasoning) and an answer; target lengths long-tailed like reasoning traces
    (``bench_train_gpu.reasoning_lengths``, in words, about 0.6 of ``max_tokens`` at most).
    Every fourth is two-turn (the R1 template drops the first turn's ``<think>`` part)."""
    from bench_train_gpu import reasoning_lengths

    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
                    for _ in range(600)})
    lengths = reasoning_lengths(count, int(max_tokens * 0.6), seed=seed)

    def sentence(n: int) -> str:
        out = []
        while len(out) < n:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            out += rng.sample(words, 6) + [f"so {a} + {b} = {a + b}."]
        return " ".join(out[:n])

    convs = []
    for i, n in enumerate(int(x) for x in lengths):
        turns = 2 if i % 4 == 3 else 1
        msgs = []
        for t in range(turns):
            think = max(n // turns - 24, 8)
            msgs.append({"role": "user", "content": f"Problem {i}.{t}: {sentence(12)}?"})
            msgs.append({"role": "assistant",
                         "content": f"<think>\n{sentence(think)}\n</think>\n\n"
                                    f"The answer is {sentence(10)}"})
        convs.append({"messages": msgs})
    return convs


def _fit_conversations(convs: list[dict], tok, max_tokens: int) -> list[dict]:
    """Shorten any conversation whose rendered length exceeds ``max_tokens`` (so the
    tokenizer's MAX_LEN never drops one)."""
    out = []
    for conv in convs:
        for _ in range(6):
            text = tok.apply_chat_template(conv["messages"], tokenize=False)
            n = len(tok(text, add_special_tokens=False)["input_ids"])
            if n <= max_tokens:
                break
            keep = max_tokens / n * 0.9
            for m in conv["messages"]:
                if m["role"] == "assistant":
                    head, _, rest = m["content"].partition("\n</think>")
                    body = head.split(" ")
                    m["content"] = " ".join(body[:max(int(len(body) * keep), 4)]) + \
                        "\n</think>" + rest
        out.append(conv)
    return out


def child_prep(args) -> int:
    """The setup probe, then every input of the throughput and recipe steps (CPU only): run
    in the background."""
    p = _paths(args)
    try:
        info = probe(args)
    except Exception as e:
        import traceback

        traceback.print_exc()
        info = {"error": f"{type(e).__name__}: {e}"[:400]}
        _write_json(p["state"] / "setup.json", dict(info, attention={}, experts="?",
                                                     versions={}, device_name="?"))
    if info.get("error"):
        return 1
    state = p["state"]
    env = dict(os.environ, PYTHON=sys.executable)
    # --- throughput: a random Qwen2-1.5B-shaped model, converted, and packed data per length
    marker = state / "prep_throughput.json"
    if _read_json(marker) is None or _read_json(marker).get("status") != "ok":
        t = time.time()
        try:
            import torch

            from bench_train_gpu import QWEN2_1_5B, make_assets

            shape = TINY_QWEN2 if args.tiny else QWEN2_1_5B
            seqs = sorted({c["seq"] for c in _configs(args)
                           if _runnable(c["backend"], args.device) is None})
            data = {}
            ckpt = None
            torch.set_num_threads(max(1, min(8, (os.cpu_count() or 2) // 2)))
            for seq in seqs:
                ckpt, prefix = make_assets(p["throughput"], shape, seq,
                                           documents=120 if args.tiny else 1000)
                data[str(seq)] = prefix
            _write_json(marker, {"status": "ok", "ckpt": str(ckpt) if ckpt else None,
                                 "data": data, "seconds": round(time.time() - t, 1)})
            print(f"throughput inputs ready in {time.time() - t:.1f}s: {data}", flush=True)
        except Exception as e:
            import traceback

            traceback.print_exc()
            _write_json(marker, {"status": "failed", "error": f"{type(e).__name__}: {e}"[:400],
                                 "seconds": round(time.time() - t, 1)})
    # --- recipe: tokenizer, conversations, the R1-shaped model, convert, tokenize
    marker = state / "prep_recipe.json"
    t0 = time.time()
    timings: dict[str, float] = {}
    try:
        import torch
        from transformers import AutoTokenizer

        from bench_train_gpu import R1_DISTILL_QWEN_1_5B
        from megatron.sft.bridge.random_hf_model import make_random_hf_model
        from megatron.sft.data.tiny_tokenizer import save_tiny_tokenizer

        seq = 256 if args.tiny else 16384
        count = 40 if args.tiny else 300
        t = time.time()
        convs = synthetic_reasoning_conversations(count, seq)
        corpus = [m["content"] for c in convs[:100] for m in c["messages"]]
        tok_dir = save_tiny_tokenizer(p["tokenizer"], template="deepseek_r1", corpus=corpus,
                                      vocab_size=600 if args.tiny else 4096)
        tok = AutoTokenizer.from_pretrained(tok_dir)
        convs = _fit_conversations(convs, tok, int(seq * 0.9))
        p["data_file"].parent.mkdir(parents=True, exist_ok=True)
        with open(p["data_file"], "w") as f:
            for c in convs:
                f.write(json.dumps(c) + "\n")
        timings["tokenizer + conversations"] = round(time.time() - t, 1)
        t = time.time()
        base = dict(TINY_QWEN2) if args.tiny else dict(R1_DISTILL_QWEN_1_5B)
        base.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id)
        shutil.rmtree(p["hf"], ignore_errors=True)
        torch.set_num_threads(max(1, min(8, (os.cpu_count() or 2) // 2)))
        make_random_hf_model("Qwen2ForCausalLM", p["hf"], config=base, dtype=torch.bfloat16,
                             seed=21)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok_dir / name, p["hf"] / name)
        timings["random HF model"] = round(time.time() - t, 1)
        from megatron.sft.bridge.architectures import shape_of

        _, shape = shape_of(json.loads((p["hf"] / "config.json").read_text()))
        params = sum(v.numel() for v in _safetensors_shapes(p["hf"]))
        for name, cmd, sub_env in (
                ("convert_deepseek_r1_to_megatron.sh 1.5B 1 1",
                 ["bash", str(REPO / "scripts/checkpoints/convert_deepseek_r1_to_megatron.sh"),
                  "1.5B", "1", "1"], {"ASSETS_DIR": str(p["assets"]), "FORCE": "1"}),
                (f"tokenize_dataset.sh {seq}",
                 ["bash", str(REPO / "scripts/data/tokenize_dataset.sh"), str(p["hf"]),
                  str(p["data_file"]), str(seq), "1" if args.tiny else "8"],
                 {"FORCE": "1", "EXTRA_ARGS": "--no-progress"})):
            t = time.time()
            print(f"$ {shlex.join(cmd)}", flush=True)
            rc, output = run_script(cmd, dict(env, **sub_env), in_process=args.tiny)
            print(output, flush=True)
            timings[name] = round(time.time() - t, 1)
            if rc != 0:
                lines = [x for x in output.splitlines() if x.strip()]
                raise RuntimeError(f"{name} exited {rc}: {lines[-1] if lines else 'no output'}")
        stats = _read_json(Path(str(p["data_prefix"]) + "_stats.json")) or {}
        _write_json(marker, {
            "status": "ok", "seconds": round(time.time() - t0, 1), "timings": timings,
            "conversations": len(convs), "vocab": len(tok), "params": params,
            "layers": shape.num_layers, "hidden": shape.hidden_size,
            "checkpoint_gb": round(params * 14 / 1e9, 2),
            "samples": stats.get("samples_written"), "tokens": stats.get("tokens"),
            "loss_tokens": stats.get("loss_tokens"),
            "max_sample_tokens": stats.get("max_sample_tokens")})
        print(f"recipe inputs ready in {time.time() - t0:.1f}s: {timings}", flush=True)
    except Exception as e:
        import traceback

        traceback.print_exc()
        _write_json(marker, {"status": "failed", "error": f"{type(e).__name__}: {e}"[:400],
                             "seconds": round(time.time() - t0, 1), "timings": timings})
        return 0
    # Then wait to read the recipe's export back: this process has torch and transformers
    # imported already (seconds saved); the orchestrator asks with state/forward_request.json.
    request = _wait_for(state / "forward_request.json", args.deadline or time.time() + 3600)
    if request is None:
        return 0
    import contextlib

    with open(p["out"] / "recipe.log", "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        print("\n(export and transformers forward, in the background process that prepared "
              "the inputs)", flush=True)
        return export_and_forward(args)


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


def _safetensors_shapes(hf: Path):
    import torch
    from safetensors import safe_open

    for f in sorted(hf.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                yield torch.empty(st.get_slice(name).get_shape(), device="meta")


# ------------------------------------------------------------------------------ throughput worker
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
            emit(_profile(args, best, prep))
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
        emit(dict(done["profile"], trace=_export_trace(args, deadline)))
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


def _label_regions(trainer):
    """``record_function`` labels around our own code for the profile (see PROFILE_RULES),
    installed on this Trainer's instance and modules only; returns an undo function."""
    from torch.profiler import record_function

    from megatron.sft.model.attention import PackedCoreAttention
    from megatron.sft.training import trainer as trainer_mod

    def labelled(fn, label):
        def wrapper(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return wrapper

    undo = []
    trainer._microbatches = labelled(trainer._microbatches, "sft::data")
    undo.append(lambda: trainer.__dict__.pop("_microbatches", None))
    opt = trainer.optimizer
    for name in ("step", "zero_grad"):
        setattr(opt, name, labelled(getattr(opt, name), "sft::optimizer"))
        undo.append(lambda n=name: opt.__dict__.pop(n, None))
    trainer.scheduler.step = labelled(trainer.scheduler.step, "sft::optimizer")
    undo.append(lambda: trainer.scheduler.__dict__.pop("step", None))
    for m in trainer.model:
        m.zero_grad_buffer = labelled(m.zero_grad_buffer, "sft::optimizer")
        undo.append(lambda m=m: m.__dict__.pop("zero_grad_buffer", None))
        for mod in m.modules():
            if isinstance(mod, PackedCoreAttention):
                mod.kernel = labelled(mod.kernel, "sft::attention")
    original_loss = trainer_mod.vocab_parallel_token_loss
    trainer_mod.vocab_parallel_token_loss = labelled(original_loss, "sft::loss")
    undo.append(lambda: setattr(trainer_mod, "vocab_parallel_token_loss", original_loss))
    return lambda: [u() for u in undo]


def _profile(args, best: dict, prep: dict) -> dict:
    """1 warm-up + 2 profiled iterations of ``best``; time by category."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    c = {k: best[k] for k in ("key", "seq", "backend", "recompute", "gbs")}
    print(f"## profile of {c['key']}: building", flush=True)
    t0 = time.time()
    row: dict[str, Any] = {"key": "profile", "config": c["key"], "status": "ok",
                           "iterations": 2}
    box: list = []
    undo = None
    cuda = torch.cuda.is_available() and args.device == "cuda"
    try:
        box.append(_trainer(args, c, prep, 3))
        trainer = box[0]
        trainer.setup()
        undo = _label_regions(trainer)
        trainer.train_step()  # warm-up (and flex's compile, were this a fresh process)
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, record_shapes=False) as prof:
            t1 = time.perf_counter()
            for _ in range(2):
                trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t1
        t2 = time.time()
        row.update(profile_categories(prof.events(), cuda))
        if not row["total_ms"]:
            raise RuntimeError("the profiler recorded no " + ("CUDA kernels (CUPTI?)" if cuda
                                                                 else "ops"))
        row["wall_ms"] = round(wall * 1e3, 1)
        row["busy_pct"] = round(100 * row["total_ms"] / row["wall_ms"], 1) if wall else None
        row["parse_s"] = round(time.time() - t2, 1)
        row["trace"] = None
        if args.trace:  # written at the end, if time is left: the 16k flex numbers come first
            _KEPT_PROFILE[:] = [prof]
    except Exception as e:
        row["status"] = "OOM" if _is_oom(e) else "error"
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        import traceback

        traceback.print_exc()
    finally:
        if undo is not None:
            undo()
        trainer = undo = None  # the undo closures hold the Trainer too
        _release(box)
    row["wall_s"] = round(time.time() - t0, 1)
    return row


#: the last profile, kept for --trace until the worker's other configurations are done
_KEPT_PROFILE: list = []


def _export_trace(args, deadline: float) -> str:
    """OUT/trace.json.gz from the kept profile, when it fits 15 MB and the time left."""
    if not _KEPT_PROFILE:
        return "no profile kept"
    if deadline - time.time() < (5 if args.tiny else 30):
        return "not written: too little time left in the throughput budget"
    prof = _KEPT_PROFILE.pop()
    raw = Path(args.workdir) / "trace.json"
    prof.export_chrome_trace(str(raw))
    target = Path(args.out) / "trace.json.gz"
    with open(raw, "rb") as src, gzip.open(target, "wb", compresslevel=5) as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    if target.stat().st_size > 15 * 2**20:
        target.unlink()
        return "not kept: over 15 MB gzipped (the run tool returns 16 MB a file)"
    return target.name


def profile_categories(events, cuda: bool) -> dict:
    """Time by category (:data:`PROFILE_RULES`) of a profile's events: CUDA kernel time on a
    GPU, each op's self CPU time on CPU. Returns ms and shares per category, the total, and the
    40 biggest kernels (or ops) with their category, so the rules can be checked."""
    from torch.autograd import DeviceType

    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]
    device_events = [e for e in events if e.device_type == DeviceType.CUDA]
    # record_function ranges also appear on the GPU timeline ("gpu_user_annotation") and may be
    # attached to a CPU op like a kernel: they are not GPU work (torch's own tables skip them)
    annotations = {e.name for e in device_events if getattr(e, "is_user_annotation", False)}
    chains: dict[int, str] = {}

    def chain(e) -> str:
        key = id(e)
        if key not in chains:
            names, node = [], e
            while node is not None and len(names) < 40:
                names.append(node.name)
                node = node.cpu_parent
            chains[key] = " <- ".join(names)
        return chains[key]

    # forward ops' labels by autograd sequence number, for the kernels of the backward pass
    labels_by_seq: dict[int, set] = collections.defaultdict(set)
    for e in cpu_events:
        if e.sequence_nr is not None and e.sequence_nr >= 0:
            text = chain(e)
            if "evaluate_function" not in text:
                labels_by_seq[e.sequence_nr].update(re.findall(r"sft::\w+", text))

    def backward_labels(e) -> str:
        node = e
        while node is not None:
            if node.name.startswith("autograd::engine::evaluate_function"):
                found = labels_by_seq.get(node.sequence_nr, ())
                return (" <- fwd: " + " ".join(sorted(found))) if found else ""
            node = node.cpu_parent
        return ""

    ms = dict.fromkeys(CATEGORIES, 0.0)
    per_name: dict[tuple[str, str], list] = {}
    attributed = 0.0
    for e in cpu_events:
        if cuda:
            items = [(k.name, k.duration) for k in e.kernels if k.name not in annotations]
            text = None
        else:
            items = [(e.name, e.self_cpu_time_total)] if e.self_cpu_time_total > 0 else []
            text = None
        for name, us in items:
            if text is None:
                text = (chain(e) if cuda else chain(e.cpu_parent) if e.cpu_parent else "") + \
                    backward_labels(e)
            cat = classify(name, text)
            ms[cat] += us / 1e3
            attributed += us / 1e3
            entry = per_name.setdefault((name, cat), [0, 0.0])
            entry[0] += 1
            entry[1] += us / 1e3
    unattributed = 0.0
    if cuda:
        total_device = sum(e.time_range.elapsed_us() for e in device_events
                           if not getattr(e, "is_user_annotation", False)) / 1e3
        unattributed = max(total_device - attributed, 0.0)
        ms["other"] += unattributed
    total = sum(ms.values())
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:40]
    return {"ms": {k: round(v, 2) for k, v in ms.items()},
            "shares": {k: round(100 * v / total, 1) if total else 0.0 for k, v in ms.items()},
            "total_ms": round(total, 2), "unattributed_ms": round(unattributed, 2),
            "what": "CUDA kernel time" if cuda else "self CPU time of ops",
            "top": [{"name": n[:160], "category": cat, "count": cnt, "ms": round(t, 3)}
                    for (n, cat), (cnt, t) in top]}


# --------------------------------------------------------------------------------- HF forward
def child_forward(args) -> int:
    return export_and_forward(args)


def export_and_forward(args) -> int:
    """``merge_and_export.sh`` of the recipe's run, then the export through transformers:
    load, one conversation through the chat template, a forward pass with labels
    (state/forward.json)."""
    p = _paths(args)
    cuda = args.device == "cuda"
    result: dict[str, Any] = {"finite": False}
    t0 = time.time()
    cmd = ["bash", str(REPO / "scripts/checkpoints/merge_and_export.sh"), str(p["save"]),
           str(p["hf"]), str(p["export"])]
    print(f"$ {shlex.join(cmd)}", flush=True)
    rc, output = run_script(cmd, dict(os.environ, PYTHON=sys.executable), in_process=args.tiny)
    print(output, flush=True)
    result["export_s"] = round(time.time() - t0, 1)
    if rc != 0:
        lines = [x for x in output.splitlines() if x.strip()]
        result["error"] = f"merge_and_export.sh exited {rc}: {lines[-1] if lines else ''}"
        _write_json(p["state"] / "forward.json", result)
        print(f"error: {result['error']}", flush=True)
        return 1
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(p["export"])
    model = AutoModelForCausalLM.from_pretrained(
        p["export"], dtype=torch.bfloat16 if cuda else torch.float32)
    model = model.to("cuda" if cuda else "cpu").eval()
    conv = json.loads(p["data_file"].read_text().splitlines()[0])
    text = tok.apply_chat_template(conv["messages"], tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :1024]
    ids = ids.to(model.device)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    result.update(loss=float(out.loss), logits_shape=list(out.logits.shape),
                  finite=bool(torch.isfinite(out.logits).all()),
                  architecture=type(model).__name__, dtype=str(model.dtype),
                  params=sum(x.numel() for x in model.parameters()),
                  vocab_size=model.config.vocab_size, forward_s=round(time.time() - t0, 1),
                  files=sorted(x.name for x in p["export"].iterdir()))
    _write_json(p["state"] / "forward.json", result)
    print(f"transformers forward of {p['export']}: {result}", flush=True)
    return 0 if result["finite"] else 1


# ============================================================================================ main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.workdir is None:
        args.workdir = str(_default_workdir(args))
    args.workdir = str(Path(args.workdir).resolve())
    args.out = str(Path(args.out).resolve())
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.run_step:
        from megatron.sft.runtime.distributed import quiet_megatron_import_warnings

        quiet_megatron_import_warnings()
        return {"prep": child_prep, "throughput": child_throughput,
                "forward": child_forward}[args.run_step](args)
    return Proof(args).main()


if __name__ == "__main__":
    sys.exit(main())
