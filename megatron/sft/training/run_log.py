"""What a run reports each iteration: the record (JSON log, TensorBoard/W&B every iteration),
the console line (every ``--log-interval``-th), the progress bar, and the GPU's TFLOP/s, MFU
and peak memory."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import torch

from megatron.sft.model.moe.metrics import console_summary
from megatron.sft.training.eval_generation import console_lines
from megatron.sft.training.metrics import MetricSinks, peak_tflops, training_flops


class RunLog:
    """Only the logging rank writes; the others' calls do nothing."""

    def __init__(self, cfg, is_logger: bool, device, log: Callable[[str], None]):
        self.cfg, self.is_logger, self.device, self.log = cfg, is_logger, device, log
        self.peak_tflops = (peak_tflops(torch.cuda.get_device_name())
                            if device.type == "cuda" else None)
        self.sinks = (MetricSinks(cfg.tensorboard_dir, cfg.wandb_project, dataclasses.asdict(cfg))
                      if is_logger else None)
        self.bar = None

    def open_progress(self, total: int, initial: int) -> None:
        if self.is_logger and not self.cfg.no_progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="it", desc="train")

    def step_record(self, step, iteration: int, lr: float, consumed_samples: int
                    ) -> dict[str, Any]:
        cfg = self.cfg
        return {"iteration": iteration, "loss": step.loss, "lr": lr,
                "grad_norm": None if step.grad_norm is None else float(step.grad_norm),
                "consumed_samples": consumed_samples, "loss_tokens": step.tokens,
                "ms_per_iter": step.seconds * 1e3,
                "tokens_per_s": cfg.global_batch_size * cfg.seq_length / step.seconds,
                "skipped": step.skipped}

    def device_metrics(self, step, shape, dataset, first_row: int) -> dict[str, float]:
        """TFLOP/s per GPU, MFU and peak memory on GPU. Model FLOPs of the global batch's real
        documents (attention per document, padding not counted), see ``training_flops``."""
        if self.device.type != "cuda":
            return {}
        gbs = self.cfg.global_batch_size
        lengths = [n for r in range(first_row, first_row + gbs)
                   for n in dataset.document_lengths(r % len(dataset)).tolist()]
        world = torch.distributed.get_world_size()
        tflops = training_flops(shape, lengths) / step.seconds / world / 1e12
        out = {"tflops_per_gpu": tflops,
               "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
        return out

    def record(self, record: dict[str, Any], train_iters: int) -> None:
        """Every iteration goes to the JSON log and TensorBoard/W&B; the console gets every
        ``--log-interval``-th (and the last); the bar moves."""
        if not self.is_logger:
            return
        if self.sinks is not None:
            self.sinks.log(record)
        if self.cfg.log_json:
            with open(self.cfg.log_json, "a") as f:
                f.write(json.dumps(record) + "\n")
        iteration = record["iteration"]
        if iteration % self.cfg.log_interval == 0 or iteration == train_iters:
            self.log(console_line(record, train_iters))
        for line in console_lines(record.get("generations") or [], iteration):
            self.log(line)  # --eval-generate: at every evaluation, whatever --log-interval
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.sinks is not None:
            self.sinks.close()


def console_line(record: dict[str, Any], train_iters: int) -> str:
    """``iter 3/10 | loss 2.1034 | lr 1.000e-04 | grad_norm 0.812 | samples 24 | ...``"""
    parts = [f"iter {record['iteration']}/{train_iters}",
             f"loss {record['loss']:.4f}", f"lr {record['lr']:.3e}"]
    if record["grad_norm"] is not None:
        parts.append(f"grad_norm {record['grad_norm']:.3f}")
    parts += [f"samples {record['consumed_samples']}", f"{record['ms_per_iter']:.0f} ms/it",
              f"{record['tokens_per_s']:.0f} tok/s"]
    if "tflops_per_gpu" in record:
        parts.append(f"{record['tflops_per_gpu']:.1f} TFLOP/s/GPU")
        if "mfu" in record:
            parts.append(f"MFU {record['mfu']:.1%}")
        parts.append(f"mem {record['max_memory_gib']:.1f} GiB")
    if "valid_loss" in record:
        parts.append(f"valid_loss {record['valid_loss']:.4f} ppl {record['valid_ppl']:.2f}")
    if (routing := console_summary(record)) is not None:  # MoE: per-layer aux / imbalance
        parts.append(routing)
    return " | ".join(parts)


