"""The whole pipeline on a built-in tiny default, offline on a CPU: what `make demo` runs.

tokenizer (BPE trained here, ChatML template) -> tiny Qwen2 HF model -> synthetic multi-turn
data with held-out prompts -> accuracy before SFT -> convert to Megatron TP=2 -> logits parity
-> pre-tokenize -> SFT on 2 gloo ranks -> export to HF -> logits parity of the export ->
accuracy after SFT -> loss-curve PNG. Each stage is timed; the summary says what happened.
With ``moe`` the model is a tiny Qwen3-MoE (8 experts, top-2) split EP=2 over the 2 ranks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from megatron.sft.quickstart.progress import LogFollower, TrainingView
from megatron.sft.quickstart.task import TaskConfig, make_task, tokenizer_corpus

REPO = Path(__file__).resolve().parents[3]


@dataclasses.dataclass
class DemoConfig:
    workdir: Path
    tensor_model_parallel_size: int = 2
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    hidden_size: int = 128
    num_layers: int = 4
    seq_length: int = 128
    micro_batch_size: int = 16
    global_batch_size: int = 16
    train_iters: int = 400
    lr: float = 3e-3
    eval_interval: int = 100
    log_interval: int = 20
    #: > 0: afterwards, adapt the fine-tuned model to a second task ("Next: ...") with LoRA
    #: adapters of this rank on all four targets (alpha = 2 x rank), export them merged, and
    #: measure that task's held-out accuracy before and after
    lora_rank: int = 0
    lora_train_iters: int = 200
    #: the LoRA stage's global batch: twice full SFT's, since its 200 steps see the second task
    #: for the first time (at 16 it reached 84 % held-out, at 32 the goal)
    lora_global_batch_size: int = 32
    lora_lr: float = 3e-3
    #: a Mixture-of-Experts model instead: Qwen3-MoE-shaped (8 experts, top-2, expert FFN
    #: ``hidden_size``), its experts split over the ranks (EP = TP size, TP 1)
    moe: bool = False
    num_experts: int = 8


#: what the demo's model is, dense or MoE: (architecture, extra config, what to call it)
_MODELS = {
    False: ("Qwen2ForCausalLM", lambda c: dict(intermediate_size=3 * c.hidden_size),
            "Qwen2-shaped"),
    True: ("Qwen3MoeForCausalLM", lambda c: dict(
        intermediate_size=3 * c.hidden_size, moe_intermediate_size=c.hidden_size,
        num_experts=c.num_experts, num_experts_per_tok=2, norm_topk_prob=True,
        head_dim=c.hidden_size // 4, tie_word_embeddings=False), "Qwen3-MoE-shaped"),
}


class StageFailed(RuntimeError):
    pass


def _torchrun(nproc: int, script: str, args: list[str], log: Path,
              watch: Optional[Callable[[], None]] = None) -> None:
    """Run one of our tools on ``nproc`` local ranks; its output goes to ``log``. ``watch`` is
    called about twice a second while it runs, and once after (the demo's live progress)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), str(REPO / script), *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if watch is not None:
                        watch()
        except BaseException:  # Ctrl-C or a failing view: leave no ranks behind
            proc.kill()
            proc.wait()
            raise
    if watch is not None:
        watch()
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise StageFailed(f"{script} failed (exit {proc.returncode}); log {log}:\n{tail}")


def _write_jsonl(path: Path, records: list) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _first_line_with(log: Path, text: str) -> str:
    """The first line of a tool's log that holds ``text`` ("" when none does)."""
    return next((line for line in log.read_text().splitlines() if text in line), "")


@dataclasses.dataclass(frozen=True)
class DemoPaths:
    """Where each stage writes, fixed before the first stage runs (the summary lists them)."""

    tokenizer: Path
    hf: Path
    data: Path
    heldout: Path
    ckpt: Path
    run: Path
    export: Path
    log: Path
    png: Path
    logs: Path
    lora_data: Path
    lora_run: Path
    lora_export: Path
    lora_log: Path

    @classmethod
    def under(cls, w: Path, cfg: DemoConfig) -> "DemoPaths":
        tp = cfg.tensor_model_parallel_size
        return cls(tokenizer=w / "tokenizer",
                   hf=w / ("hf_tiny_qwen3_moe" if cfg.moe else "hf_tiny_qwen2"),
                   data=w / "data" / "repeat.jsonl", heldout=w / "data" / "heldout.json",
                   ckpt=w / (f"megatron_TP1PP1EP{tp}" if cfg.moe else f"megatron_TP{tp}PP1"),
                   run=w / "sft_run", export=w / "export_hf", log=w / "train_log.jsonl",
                   png=w / "loss_curve.png", logs=w / "logs",
                   lora_data=w / "data" / "next.jsonl", lora_run=w / "lora_run",
                   lora_export=w / "export_hf_lora", lora_log=w / "train_log_lora.jsonl")

    def listed(self, lora: bool) -> dict[str, str]:
        """The paths the summary JSON names (``lora_*`` only when the LoRA stages run)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("heldout", "logs") or (f.name.startswith("lora_") and not lora):
                continue
            out[f.name] = str(getattr(self, f.name))
        return out


@dataclasses.dataclass
class Demo:
    """Runs the stages in order; each stage is a method returning its one-line result.

    State that later stages need (the vocabulary size, the dataset prefixes) is kept on the
    instance as each stage produces it, so a stage reads as what it does, top to bottom."""

    cfg: DemoConfig
    say: Callable[[str], None] = print
    #: where training's progress goes (a live line in a terminal, else every ``log_interval``
    #: iterations); ``None``: nowhere
    progress: Optional[TextIO] = dataclasses.field(default_factory=lambda: sys.stdout)
    rows: list[tuple[str, float, str]] = dataclasses.field(default_factory=list)
    results: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        c = self.cfg
        self.paths = DemoPaths.under(c.workdir, c)
        self.arch, self._arch_config, self.arch_name = _MODELS[c.moe]
        self.nproc = c.tensor_model_parallel_size
        # The ranks split the experts when there are any, else the layers' heads and FFN.
        from megatron.sft.runtime.layout import ParallelLayout

        self.layout = (ParallelLayout(1, 1, ep=self.nproc) if c.moe
                       else ParallelLayout(self.nproc, 1))
        self.split = self.layout.describe().replace(" ", "").replace("PP1", "")
        self.parallel_flags = (["--expert-model-parallel-size", str(self.nproc)] if c.moe
                               else ["--tensor-model-parallel-size", str(self.nproc)])
        self.records, self.heldout = make_task(c.task)
        self.lora_records, self.lora_heldout = make_task(dataclasses.replace(c.task, kind="next"))

    def stage(self, name: str, fn: Callable[[], str]) -> None:
        self.say(f"==> {name}")
        t0 = time.perf_counter()
        detail = fn() or ""
        seconds = time.perf_counter() - t0
        self.rows.append((name, seconds, detail))
        self.say(f"    {detail} ({seconds:.1f}s)")

    @property
    def w(self) -> Path:
        return self.cfg.workdir

    def stages(self) -> list[tuple[str, Callable[[], str]]]:
        """The pipeline as data: (what the console calls it, the call that does it)."""
        p = self.paths
        out = [
            ("make tokenizer", self.make_tokenizer),
            ("make tiny HF model", self.make_model),
            ("make SFT data", self.make_data),
            ("accuracy before SFT",
             lambda: self.accuracy(p.hf, self.heldout, "accuracy_before", p.tokenizer)),
            ("convert HF -> Megatron", self.convert),
            ("logits parity (converted)", lambda: self.parity(p.ckpt, p.hf, "converted")),
            ("pre-tokenize", self.tokenize),
            ("SFT training", self.train),
            ("export Megatron -> HF", lambda: self.export(p.run, p.export)),
            ("logits parity (exported)", lambda: self.parity(p.run, p.export, "exported")),
            ("accuracy after SFT", lambda: self.accuracy(p.export, self.heldout, "accuracy_after")),
            ("loss curve", self.plot),
        ]
        if self.cfg.lora_rank:
            out += [
                ("LoRA: make + tokenize data", self.make_lora_data),
                ("LoRA: accuracy before",
                 lambda: self.accuracy(p.export, self.lora_heldout, "lora_accuracy_before")),
                ("LoRA: training", self.lora_train),
                ("LoRA: export merged -> HF", lambda: self.export(p.lora_run, p.lora_export)),
                ("LoRA: accuracy after",
                 lambda: self.accuracy(p.lora_export, self.lora_heldout, "lora_accuracy_after")),
            ]
        return out

    def run(self) -> dict[str, Any]:
        if self.w.exists():
            shutil.rmtree(self.w)
        self.paths.logs.mkdir(parents=True)
        self.results["paths"] = self.paths.listed(lora=bool(self.cfg.lora_rank))
        for name, fn in self.stages():
            self.stage(name, fn)
        self.results["stages"] = [{"name": n, "seconds": s, "detail": d} for n, s, d in self.rows]
        (self.w / "summary.json").write_text(json.dumps(self.results, indent=2))
        return self.results

    # ------------------------------------------------------------------ stages
    def make_tokenizer(self) -> str:
        from megatron.sft.data.tiny_tokenizer import save_tiny_tokenizer
        from transformers import AutoTokenizer

        save_tiny_tokenizer(self.paths.tokenizer, template="chatml", corpus=tokenizer_corpus(),
                            vocab_size=512)
        self.vocab = len(AutoTokenizer.from_pretrained(self.paths.tokenizer))
        return f"byte-level BPE, {self.vocab} tokens, ChatML template"

    def make_model(self) -> str:
        from megatron.sft.bridge.random_hf_model import make_random_hf_model

        c, p = self.cfg, self.paths
        make_random_hf_model(self.arch, p.hf, seed=c.task.seed, overrides=dict(
            vocab_size=self.vocab, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            **self._arch_config(c)))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(p.tokenizer / name, p.hf / name)
        experts = f", {c.num_experts} experts (top-2)" if c.moe else ""
        return (f"{self.arch_name}, {c.num_layers} layers, hidden {c.hidden_size}{experts}, "
                "random weights")

    def make_data(self) -> str:
        self.paths.data.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(self.paths.data, self.records)
        self.paths.heldout.write_text(json.dumps(self.heldout, indent=1))
        return (f"{len(self.records)} conversations ('Repeat: w1 w2 ...'), {len(self.heldout)} "
                "held-out prompts never seen in training")

    def convert(self) -> str:
        from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron

        meta = convert_hf_to_megatron(self.paths.hf, self.paths.ckpt, ConvertOptions(
            layout=self.layout, progress=False))
        return f"{self.split}: vocab padded {self.vocab} -> {meta.padded_vocab_size}"

    def parity(self, ckpt: Path, hf: Path, tag: str) -> str:
        out = self.paths.logs / f"parity_{tag}.json"
        _torchrun(self.nproc, "tools/check_hf_parity.py",
                  ["--load", str(ckpt), "--hf-model", str(hf), "--output-json", str(out)],
                  self.paths.logs / f"parity_{tag}.log")
        diff = json.loads(out.read_text())["max_abs_diff"]
        self.results[f"parity_{tag}"] = diff
        return f"megatron-core on {self.nproc} gloo ranks vs transformers: max |dlogits| {diff:.1e}"

    def tokenize(self) -> str:
        stats = self._pretokenize(self.paths.data)
        self.data_prefix = stats.output_prefix
        self.results["tokens"] = stats.tokens
        return (f"{stats.samples_written} samples, {stats.tokens} tokens, {stats.loss_tokens} "
                f"loss tokens -> {Path(stats.output_prefix).name}_*.bin/.idx")

    def train(self) -> str:
        c, p = self.cfg, self.paths
        log = self._train_run(p.ckpt, p.run, self.data_prefix, c.train_iters, c.lr, p.log,
                              "train.log", [])
        self.results["loss_start"], self.results["loss_end"] = log[0]["loss"], log[-1]["loss"]
        line = _first_line_with(p.logs / "train.log", "packing efficiency")
        eff = line.split("packing efficiency ")[-1].split(")")[0] if line else "?"
        self.results["packing_efficiency"] = eff
        return (f"{c.train_iters} iterations, {self.split} on {self.nproc} gloo ranks, packing "
                f"efficiency {eff}; loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}")

    def export(self, run: Path, out: Path) -> str:
        from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
        from megatron.sft.lora.merge import open_checkpoint

        export_megatron_to_hf(open_checkpoint(run), out, self.paths.hf,
                              ExportOptions(progress=False))
        return f"{out}"

    def accuracy(self, model: Path, prompts: list, key: str,
                 tokenizer: Optional[Path] = None) -> str:
        """Greedy exact match on held-out prompts; an exported model brings its own tokenizer."""
        from megatron.sft.quickstart.evaluate import generation_accuracy

        acc, examples = generation_accuracy(model, tokenizer or model, prompts)
        self.results[key] = acc
        if tokenizer is not None:  # the untrained model: its answers are noise, not worth a line
            return f"exact match {acc:.0%} on held-out prompts"
        self.results[key + "_examples"] = examples[:3]
        sample = "; ".join(f"{q!r} -> {g!r}" for q, _, g in examples[:2])
        return f"exact match {acc:.0%} on held-out prompts (e.g. {sample})"

    def plot(self) -> str:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        subprocess.run([sys.executable, str(REPO / "tools" / "plot_training_log.py"),
                        str(self.paths.log), str(self.paths.png), "--title",
                        f"Megatron-SFT demo: tiny {self.arch_name.split('-shaped')[0]} learns "
                        "'Repeat:'"],
                       check=True, env=env, capture_output=True)
        return str(self.paths.png)

    # ------------------------------------------------- LoRA: the "Next:" task, adapters only
    def make_lora_data(self) -> str:
        _write_jsonl(self.paths.lora_data, self.lora_records)
        stats = self._pretokenize(self.paths.lora_data)
        self.lora_prefix = stats.output_prefix
        return (f"{stats.samples_written} conversations ('Next: w1 w2 ...' -> the following "
                f"words), {stats.tokens} tokens")

    def lora_train(self) -> str:
        c, p = self.cfg, self.paths
        r = c.lora_rank
        log = self._train_run(p.run, p.lora_run, self.lora_prefix, c.lora_train_iters, c.lora_lr,
                              p.lora_log, "train_lora.log",
                              ["--lora-rank", str(r), "--lora-alpha", str(2 * r),
                               "--transformer-impl", "local"], c.lora_global_batch_size)
        summary = _first_line_with(p.logs / "train_lora.log", "trainable of")
        self.results["lora_loss_start"] = log[0]["loss"]
        self.results["lora_loss_end"] = log[-1]["loss"]
        trainable = summary.split("LoRA: ")[-1].split(" on this rank")[0] if summary else "?"
        return (f"rank {r} on linear_qkv/proj/fc1/fc2 of the fine-tuned model ({trainable} "
                f"per rank), {c.lora_train_iters} iterations; loss {log[0]['loss']:.3f} -> "
                f"{log[-1]['loss']:.3f}")

    # ------------------------------------------------------------------ shared steps
    def _pretokenize(self, data: Path):
        from megatron.sft.data.preprocess import PreprocessConfig, preprocess
        from megatron.sft.data.render import RenderConfig

        return preprocess(PreprocessConfig(
            input=str(data), tokenizer_model=str(self.paths.tokenizer),
            render=RenderConfig(max_length=self.cfg.seq_length), progress=False))

    def _train_run(self, load: Path, save: Path, data_prefix: str, iters: int, lr: float,
                   log_json: Path, log_name: str, extra: list[str],
                   global_batch_size: Optional[int] = None) -> list[dict]:
        c = self.cfg
        args = ["--load", str(load), "--save", str(save),
                "--data-path", data_prefix, "--split", "98,2,0",
                "--seq-length", str(c.seq_length), "--micro-batch-size", str(c.micro_batch_size),
                "--global-batch-size", str(global_batch_size or c.global_batch_size),
                "--train-iters", str(iters),
                "--lr", str(lr), "--min-lr", str(lr / 10), "--lr-decay-style", "cosine",
                "--lr-warmup-iters", str(max(1, iters // 20)),
                *self.parallel_flags, "--attention-backend", "sdpa",
                "--eval-interval", str(c.eval_interval),
                "--eval-iters", "2", "--log-interval", str(c.log_interval),
                "--log-json", str(log_json), "--no-progress", *extra]
        view = None
        if self.progress is not None:
            follower = LogFollower(log_json)
            view = TrainingView("LoRA" if "lora" in log_name else "SFT", iters,
                                self.progress, live=self.progress.isatty(), every=c.log_interval)
        try:
            _torchrun(self.nproc, "tools/train_sft.py", args, self.paths.logs / log_name,
                      watch=(lambda: view.update(follower.new_records())) if view else None)
        finally:
            if view is not None:
                view.close()
        return [json.loads(line) for line in log_json.read_text().splitlines()]

    def summary(self) -> str:
        width = max(len(r[0]) for r in self.rows)
        lines = ["", "Summary"] + [f"  {n:<{width}}  {t:6.1f}s  {d}" for n, t, d in self.rows]
        r = self.results
        lines += [
            f"  {'total':<{width}}  {sum(x[1] for x in self.rows):6.1f}s",
            "",
            f"  loss: {r['loss_start']:.3f} -> {r['loss_end']:.3f}   packing efficiency: "
            f"{r['packing_efficiency']}",
            f"  held-out exact match: {r['accuracy_before']:.0%} before SFT -> "
            f"{r['accuracy_after']:.0%} after SFT",
            f"  loss curve: {r['paths']['png']}",
            f"  exported model: {r['paths']['export']}",
        ]
        if "lora_accuracy_after" in r:
            full = next(t for n, t, _ in self.rows if n == "SFT training")
            lora = next(t for n, t, _ in self.rows if n == "LoRA: training")
            lines += [
                f"  LoRA r{self.cfg.lora_rank} on 'Next:': held-out exact match "
                f"{r['lora_accuracy_before']:.0%} -> {r['lora_accuracy_after']:.0%}; training "
                f"{lora:.0f}s for {self.cfg.lora_train_iters} iterations vs full SFT's {full:.0f}s "
                f"for {self.cfg.train_iters}",
                f"  LoRA exported model (adapters merged): {r['paths']['lora_export']}",
            ]
        return "\n".join(lines)
