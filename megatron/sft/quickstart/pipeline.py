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


@dataclasses.dataclass
class Demo:
    cfg: DemoConfig
    say: Callable[[str], None] = print
    #: where training's progress goes (a live line in a terminal, else every ``log_interval``
    #: iterations); ``None``: nowhere
    progress: Optional[TextIO] = dataclasses.field(default_factory=lambda: sys.stdout)
    rows: list[tuple[str, float, str]] = dataclasses.field(default_factory=list)
    results: dict[str, Any] = dataclasses.field(default_factory=dict)

    def stage(self, name: str, fn: Callable[[], str]) -> None:
        self.say(f"==> {name}")
        t0 = time.perf_counter()
        detail = fn() or ""
        seconds = time.perf_counter() - t0
        self.rows.append((name, seconds, detail))
        self.say(f"    {detail} ({seconds:.1f}s)")

    # ---------------------------------------------------------------- paths
    @property
    def w(self) -> Path:
        return self.cfg.workdir

    def run(self) -> dict[str, Any]:
        c = self.cfg
        if self.w.exists():
            shutil.rmtree(self.w)
        (self.w / "logs").mkdir(parents=True)
        tp = c.tensor_model_parallel_size
        arch, arch_config, arch_name = _MODELS[c.moe]
        # The ranks split the experts when there are any, else the layers' heads and FFN.
        from megatron.sft.runtime.layout import ParallelLayout

        layout = ParallelLayout(1, 1, ep=tp) if c.moe else ParallelLayout(tp, 1)
        split = layout.describe().replace(" ", "").replace("PP1", "")
        parallel = (["--expert-model-parallel-size", str(tp)] if c.moe
                    else ["--tensor-model-parallel-size", str(tp)])
        paths = dict(tokenizer=self.w / "tokenizer",
                     hf=self.w / ("hf_tiny_qwen3_moe" if c.moe else "hf_tiny_qwen2"),
                     data=self.w / "data" / "repeat.jsonl",
                     ckpt=self.w / ("megatron_TP1PP1EP%d" % tp if c.moe else f"megatron_TP{tp}PP1"),
                     run=self.w / "sft_run", export=self.w / "export_hf",
                     log=self.w / "train_log.jsonl", png=self.w / "loss_curve.png")
        self.results["paths"] = {k: str(v) for k, v in paths.items()}
        records, heldout = make_task(c.task)

        def tokenizer():
            from megatron.sft.data.tiny_tokenizer import save_tiny_tokenizer

            save_tiny_tokenizer(paths["tokenizer"], template="chatml", corpus=tokenizer_corpus(),
                                vocab_size=512)
            from transformers import AutoTokenizer

            self.vocab = len(AutoTokenizer.from_pretrained(paths["tokenizer"]))
            return f"byte-level BPE, {self.vocab} tokens, ChatML template"

        def model():
            from megatron.sft.bridge.random_hf_model import make_random_hf_model

            make_random_hf_model(arch, paths["hf"], seed=c.task.seed, overrides=dict(
                vocab_size=self.vocab, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                **arch_config(c)))
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(paths["tokenizer"] / name, paths["hf"] / name)
            experts = f", {c.num_experts} experts (top-2)" if c.moe else ""
            return (f"{arch_name}, {c.num_layers} layers, hidden {c.hidden_size}{experts}, "
                    "random weights")

        def data():
            paths["data"].parent.mkdir(parents=True)
            with open(paths["data"], "w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            (self.w / "data" / "heldout.json").write_text(json.dumps(heldout, indent=1))
            return (f"{len(records)} conversations ('Repeat: w1 w2 ...'), {len(heldout)} held-out "
                    "prompts never seen in training")

        def accuracy_before():
            from megatron.sft.quickstart.evaluate import generation_accuracy

            acc, _ = generation_accuracy(paths["hf"], paths["tokenizer"], heldout)
            self.results["accuracy_before"] = acc
            return f"exact match {acc:.0%} on held-out prompts"

        def convert():
            from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron

            meta = convert_hf_to_megatron(paths["hf"], paths["ckpt"], ConvertOptions(
                layout=layout, progress=False))
            return f"{split}: vocab padded {self.vocab} -> {meta.padded_vocab_size}"

        def parity(ckpt: Path, hf: Path, tag: str):
            def run():
                out = self.w / "logs" / f"parity_{tag}.json"
                _torchrun(tp, "tools/check_hf_parity.py", ["--load", str(ckpt), "--hf-model",
                          str(hf), "--output-json", str(out)], self.w / "logs" / f"parity_{tag}.log")
                diff = json.loads(out.read_text())["max_abs_diff"]
                self.results[f"parity_{tag}"] = diff
                return f"megatron-core on {tp} gloo ranks vs transformers: max |dlogits| {diff:.1e}"
            return run

        def pretokenize(data: Path):
            from megatron.sft.data.preprocess import PreprocessConfig, preprocess
            from megatron.sft.data.render import RenderConfig

            return preprocess(PreprocessConfig(
                input=str(data), tokenizer_model=str(paths["tokenizer"]),
                render=RenderConfig(max_length=c.seq_length), progress=False))

        def tokenize():
            stats = pretokenize(paths["data"])
            self.data_prefix = stats.output_prefix
            self.results["tokens"] = stats.tokens
            return (f"{stats.samples_written} samples, {stats.tokens} tokens, {stats.loss_tokens} "
                    f"loss tokens -> {Path(stats.output_prefix).name}_*.bin/.idx")

        def train_run(load: Path, save: Path, data_prefix: str, iters: int, lr: float,
                      log_json: Path, log_name: str, extra: list[str],
                      global_batch_size: Optional[int] = None) -> list[dict]:
            args = ["--load", str(load), "--save", str(save),
                    "--data-path", data_prefix, "--split", "98,2,0",
                    "--seq-length", str(c.seq_length), "--micro-batch-size", str(c.micro_batch_size),
                    "--global-batch-size", str(global_batch_size or c.global_batch_size), "--train-iters", str(iters),
                    "--lr", str(lr), "--min-lr", str(lr / 10), "--lr-decay-style", "cosine",
                    "--lr-warmup-iters", str(max(1, iters // 20)),
                    *parallel, "--attention-backend", "sdpa",
                    "--eval-interval", str(c.eval_interval),
                    "--eval-iters", "2", "--log-interval", str(c.log_interval),
                    "--log-json", str(log_json), "--no-progress", *extra]
            view = None
            if self.progress is not None:
                follower = LogFollower(log_json)
                view = TrainingView("LoRA" if "lora" in log_name else "SFT", iters,
                                    self.progress, live=self.progress.isatty(),
                                    every=c.log_interval)
            try:
                _torchrun(tp, "tools/train_sft.py", args, self.w / "logs" / log_name,
                          watch=(lambda: view.update(follower.new_records())) if view else None)
            finally:
                if view is not None:
                    view.close()
            return [json.loads(line) for line in log_json.read_text().splitlines()]

        def train():
            log = train_run(paths["ckpt"], paths["run"], self.data_prefix, c.train_iters, c.lr,
                            paths["log"], "train.log", [])
            self.results["loss_start"], self.results["loss_end"] = log[0]["loss"], log[-1]["loss"]
            rows = next((line for line in (self.w / "logs" / "train.log").read_text().splitlines()
                         if "packing efficiency" in line), "")
            eff = rows.split("packing efficiency ")[-1].split(")")[0] if rows else "?"
            self.results["packing_efficiency"] = eff
            return (f"{c.train_iters} iterations, {split} on {tp} gloo ranks, packing efficiency "
                    f"{eff}; loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}")

        def export(run: Path, out: Path):
            def go():
                from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
                from megatron.sft.lora.merge import open_checkpoint

                export_megatron_to_hf(open_checkpoint(run), out, paths["hf"],
                                      ExportOptions(progress=False))
                return f"{out}"
            return go

        def accuracy(model: Path, prompts: list, key: str):
            def go():
                from megatron.sft.quickstart.evaluate import generation_accuracy

                acc, examples = generation_accuracy(model, model, prompts)  # its own tokenizer
                self.results[key] = acc
                self.results[key + "_examples"] = examples[:3]
                sample = "; ".join(f"{p!r} -> {g!r}" for p, _, g in examples[:2])
                return f"exact match {acc:.0%} on held-out prompts (e.g. {sample})"
            return go

        # ---- LoRA: adapt the fine-tuned model to the "Next:" task with adapters only
        lora_records, lora_heldout = make_task(dataclasses.replace(c.task, kind="next"))
        lora_paths = dict(data=self.w / "data" / "next.jsonl", run=self.w / "lora_run",
                          export=self.w / "export_hf_lora", log=self.w / "train_log_lora.jsonl")
        if c.lora_rank:
            self.results["paths"].update({f"lora_{k}": str(v) for k, v in lora_paths.items()})

        def lora_data():
            with open(lora_paths["data"], "w") as f:
                for r in lora_records:
                    f.write(json.dumps(r) + "\n")
            stats = pretokenize(lora_paths["data"])
            self.lora_prefix = stats.output_prefix
            return (f"{stats.samples_written} conversations ('Next: w1 w2 ...' -> the following "
                    f"words), {stats.tokens} tokens")

        def lora_train():
            r = c.lora_rank
            log = train_run(paths["run"], lora_paths["run"], self.lora_prefix, c.lora_train_iters,
                            c.lora_lr, lora_paths["log"], "train_lora.log",
                            ["--lora-rank", str(r), "--lora-alpha", str(2 * r),
                             "--transformer-impl", "local"], c.lora_global_batch_size)
            summary = next((line for line in (self.w / "logs" / "train_lora.log").read_text()
                            .splitlines() if "trainable of" in line), "")
            self.results["lora_loss_start"] = log[0]["loss"]
            self.results["lora_loss_end"] = log[-1]["loss"]
            trainable = summary.split("LoRA: ")[-1].split(" on this rank")[0] if summary else "?"
            return (f"rank {r} on linear_qkv/proj/fc1/fc2 of the fine-tuned model ({trainable} "
                    f"per rank), {c.lora_train_iters} iterations; loss {log[0]['loss']:.3f} -> "
                    f"{log[-1]['loss']:.3f}")

        def plot():
            env = dict(os.environ, PYTHONPATH=str(REPO))
            subprocess.run([sys.executable, str(REPO / "tools" / "plot_training_log.py"),
                            str(paths["log"]), str(paths["png"]), "--title",
                            f"Megatron-SFT demo: tiny {arch_name.split('-shaped')[0]} learns "
                            "'Repeat:'"],
                           check=True, env=env, capture_output=True)
            return str(paths["png"])

        self.stage("make tokenizer", tokenizer)
        self.stage("make tiny HF model", model)
        self.stage("make SFT data", data)
        self.stage("accuracy before SFT", accuracy_before)
        self.stage("convert HF -> Megatron", convert)
        self.stage("logits parity (converted)", parity(paths["ckpt"], paths["hf"], "converted"))
        self.stage("pre-tokenize", tokenize)
        self.stage("SFT training", train)
        self.stage("export Megatron -> HF", export(paths["run"], paths["export"]))
        self.stage("logits parity (exported)", parity(paths["run"], paths["export"], "exported"))
        self.stage("accuracy after SFT", accuracy(paths["export"], heldout, "accuracy_after"))
        self.stage("loss curve", plot)
        if c.lora_rank:
            self.stage("LoRA: make + tokenize data", lora_data)
            self.stage("LoRA: accuracy before", accuracy(paths["export"], lora_heldout,
                                                         "lora_accuracy_before"))
            self.stage("LoRA: training", lora_train)
            self.stage("LoRA: export merged -> HF", export(lora_paths["run"],
                                                           lora_paths["export"]))
            self.stage("LoRA: accuracy after", accuracy(lora_paths["export"], lora_heldout,
                                                        "lora_accuracy_after"))
        self.results["stages"] = [{"name": n, "seconds": s, "detail": d} for n, s, d in self.rows]
        (self.w / "summary.json").write_text(json.dumps(self.results, indent=2))
        return self.results

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
