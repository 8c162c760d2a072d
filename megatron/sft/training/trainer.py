"""The SFT training loop on megatron-core, as a composition of components that decide their
own "when": the model source (converted checkpoint, HF directory, LoRA run:
:mod:`~megatron.sft.training.model_source`), the data (:mod:`~megatron.sft.training.run_data`),
the data-parallel wrap (:mod:`~megatron.sft.training.data_parallel`), the optimizer
(:mod:`~megatron.sft.training.optimizer`), the forward/loss pass over the real pipeline
schedules (:mod:`~megatron.sft.training.forward`), the checkpointer (resume, saves, HF exports:
:mod:`~megatron.sft.training.checkpointer`), the run log (:mod:`~megatron.sft.training.run_log`),
the sample generations at evaluations (:mod:`~megatron.sft.training.eval_generation`) and the
MoE routing metrics. The loop below reads as the loop."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from megatron.sft.bridge.checkpoint_io import CheckpointMetadata
from megatron.sft.bridge.model_shape import ModelShape
from megatron.sft.data.sft_dataset import SFTDataset
from megatron.sft.model.layer_impl import LayerImpl, resolve_layer_impl
from megatron.sft.model.moe import settings as moe
from megatron.sft.model.moe.metrics import MoEMetrics, moe_metrics_for
from megatron.sft.runtime.distributed import RuntimeInfo, initialize_distributed
from megatron.sft.runtime.parallel_dims import ParallelDims
from megatron.sft.training import hf_output
from megatron.sft.training.arguments import TrainConfig
from megatron.sft.training.checkpointer import Checkpointer
from megatron.sft.training.chunked_loss import defer_output_layer, use_chunked_loss
from megatron.sft.training.data_parallel import DataParallelModel, wrap_for_data_parallel
from megatron.sft.training.eval_generation import EvalGeneration, build_eval_generation
from megatron.sft.training.forward import ForwardLoss
from megatron.sft.training.generation import GreedyGenerator
from megatron.sft.training.model_source import ModelSource
from megatron.sft.training.optimizer import build_optimizer
from megatron.sft.training.run_data import build_run_data
from megatron.sft.training.run_guard import (
    acquire_run_lock,
    check_save_directory,
    check_training_data,
)
from megatron.sft.training.run_log import RunLog
from megatron.sft.training.stop import StopRequests
from megatron.sft.training.watchdog import HangWatchdog, collective_timeout_minutes


@dataclass
class StepResult:
    loss: float
    tokens: int
    grad_norm: Optional[float]
    skipped: bool
    seconds: float


class Trainer:
    """``Trainer(cfg).setup()`` builds everything below; ``train()`` runs the loop.

    Tests and tools that need a loss without training call :meth:`forward_loss`.
    """

    # --- configuration and model description
    cfg: TrainConfig
    source: ModelSource                 # --load: converted checkpoint, HF dir or LoRA run
    shape: ModelShape
    impl: LayerImpl                     # layer modules + attention backend
    # --- parallel runtime
    info: RuntimeInfo
    dims: ParallelDims                  # this rank in the layout: writers, logger, loss groups
    dp_rank: int
    dp_size: int
    is_logger: bool                     # the last rank: holds the last pipeline stage
    run_lock: Any                       # exclusive lock on --save for the life of the run
    # --- components
    data_parallel: DataParallelModel    # the wrapped chunks and their overlap settings
    model: list                         # DDP-wrapped GPTModel chunks (one per virtual stage)
    chunked_loss: bool                  # output layer + loss in chunks (model returns hiddens)
    optimizer: Any                      # megatron-core MegatronOptimizer
    scheduler: Any                      # megatron-core OptimizerParamScheduler
    forward_loss: ForwardLoss           # (dataset, rows, forward_only) -> [loss_sum, tokens]
    checkpointer: Checkpointer          # resume, saves, --save-hf exports
    run_log: RunLog                     # JSON log, TensorBoard/W&B, console, progress bar
    train_ds: SFTDataset
    valid_ds: Optional[SFTDataset]
    data_identity: dict[str, Any]       # which data the data position points into
    moe_metrics: Optional[MoEMetrics]   # per-layer aux loss / load imbalance (MoE models)
    eval_generation: Optional[EvalGeneration]  # --eval-generate: sample answers at evaluations
    watchdog: HangWatchdog              # --hang-timeout-minutes: what each rank does, hangs
    # --- counters
    train_iters: int                    # computed once, from --train-iters or --train-epochs
    iteration: int
    consumed_samples: int               # samples the LR schedule has seen (every data)
    data_position: int                  # rows of this data consumed (the next step's first row)
    history: list[dict[str, Any]]
    started: float                      # monotonic clock at construction (--exit-duration-in-mins)
    stopped_early: Optional[str]        # why the loop stopped before its end (a signal, the clock)

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.log = log
        self._log_here = log  # rank 0's voice, for what only rank 0 does (exports)
        self.history = []
        self.iteration = 0
        self.consumed_samples = 0
        self.data_position = 0
        self.started, self.stopped_early = time.monotonic(), None
        self.watchdog = HangWatchdog(cfg.hang_timeout_minutes)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.source = ModelSource(cfg)
        notes = self.source.resolve()
        self.shape = self.source.shape
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")), self.shape.num_layers)
        moe.check_moe_run(cfg, self.shape)
        self.info = initialize_distributed(
            cfg.parallel_layout(self.shape.num_layers), seed=cfg.seed,
            timeout_minutes=collective_timeout_minutes(cfg.hang_timeout_minutes))
        self.run_lock = acquire_run_lock(cfg.save)  # before any rank writes; fails on all ranks
        self.dims = self.info.dims
        self.dp_size, self.dp_rank = self.dims.dp_size, self.dims.dp_rank
        self.is_logger = self.dims.is_logger
        if not self.is_logger:  # one voice
            self.log = lambda message: None
        for note in notes:
            self.log(note)
        hf_output.check_hf_outputs(cfg)  # --save-hf: writable, never over others' files
        self.source.describe_layout(self.dims.layout.for_checkpoint(), self.log)
        self.impl = resolve_layer_impl(cfg.transformer_impl, cfg.attention_backend,
                                       self.info.device.type, cfg.moe_experts_impl,
                                       torch.bfloat16 if cfg.bf16 else torch.float32,
                                       cp=self.dims.cp_size, pp=self.dims.layout.pp,
                                       expert_adapters=self.source.expert_adapters)
        self.log(f"layers: {self.impl.describe()}"
                 + (f", {self.impl.experts} experts" if self.shape.moe else ""))
        self.source.check_adapters()
        self.checkpointer = Checkpointer(cfg, self.source, self.log, self._log_here)
        # never replace or prune an iteration training did not write (of those this run saves)
        check_save_directory(cfg, self.checkpointer.start_iteration)
        data = build_run_data(cfg, self.log)
        self.train_ds, self.valid_ds = data.train_ds, data.valid_ds
        self.train_iters, self.data_identity = data.train_iters, data.identity
        cfg.check_schedule(self.train_iters)  # warm-up < iterations, also for --train-epochs
        self.checkpointer.plan_resume(self)
        check_training_data(self)  # vocabulary, lengths, objective: before building the model
        self.eval_generation = build_eval_generation(cfg, self.train_ds, self.valid_ds, self.log)
        self._build_model()
        if self.eval_generation is not None:
            self.eval_generation.attach(GreedyGenerator(self.model, self.shape, self.impl,
                                                        self.dims, self.tconfig,
                                                        self.info.device))
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, self.tconfig,
                                                         self.train_iters)
        self.run_log = RunLog(cfg, self.is_logger, self.info.device, self.log)
        self.checkpointer.restore(self)

    @property
    def meta(self) -> CheckpointMetadata:
        return self.source.meta

    @property
    def lora(self):
        return self.source.lora

    def _build_model(self) -> None:
        cfg = self.cfg
        overrides: dict[str, Any] = dict(calculate_per_token_loss=True,
                                         sequence_parallel=cfg.sequence_parallel,
                                         **moe.moe_config_overrides(cfg, self.shape))
        if cfg.recompute_granularity:
            overrides.update(recompute_granularity=cfg.recompute_granularity)
            if cfg.recompute_granularity == "full":
                overrides.update(recompute_method="uniform", recompute_num_layers=1)
        chunks = self.source.build(dict(
            impl=self.impl, params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
            seq_length=cfg.seq_length, verify=cfg.verify, **overrides), self.log)
        self.moe_metrics = moe_metrics_for(chunks, self.shape, self.dims, chunks[0].config)
        self.chunked_loss = use_chunked_loss(
            cfg.chunked_loss, cfg.micro_batch_size * cfg.seq_length // self.dims.cp_size,
            self.meta.padded_vocab_size, self.dims.layout.tp)
        if self.chunked_loss:
            defer_output_layer(chunks)
        self.data_parallel = wrap_for_data_parallel(chunks, cfg, self.dp_size, self.info.device)
        self.model, self.tconfig = self.data_parallel.chunks, self.data_parallel.tconfig
        self.forward_loss = ForwardLoss(cfg, self.shape, self.impl, self.dims, self.info.device,
                                        self.model, self.tconfig, self.chunked_loss)

    # ------------------------------------------------------------------ steps
    def _microbatches(self, dataset, rows: list[list[int]]) -> list[dict[str, Any]]:
        return self.forward_loss.microbatches(dataset, rows)

    def _rows(self, first_row: int) -> list[list[int]]:
        """This rank's micro-batches of the global batch that starts at ``first_row``."""
        return self.dims.rows_from(first_row, self.cfg.global_batch_size,
                                   self.cfg.micro_batch_size)

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        cfg = self.cfg
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        total = self.forward_loss(self.train_ds, self._rows(self.data_position),
                                  forward_only=False)
        loss = (total[0] / total[1].clamp(min=1)).item()
        if not math.isfinite(loss):
            if not cfg.skip_nan_steps:
                raise FloatingPointError(
                    f"loss is {loss} at iteration {self.iteration + 1}; stopping (pass "
                    "--skip-nan-steps to skip such steps, or lower --lr)")
            self._advance()
            return StepResult(loss, int(total[1].item()), None, True, time.perf_counter() - t0)
        self.watchdog.phase("optimizer", self.iteration + 1)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=cfg.global_batch_size)
        self._advance()
        return StepResult(loss, int(total[1].item()), grad_norm, not ok, time.perf_counter() - t0)

    def _advance(self) -> None:
        self.iteration += 1
        self.consumed_samples += self.cfg.global_batch_size
        self.data_position += self.cfg.global_batch_size

    @torch.no_grad()
    def evaluate(self) -> Optional[dict[str, float]]:
        if self.valid_ds is None:
            return None
        self.watchdog.phase("evaluate", self.iteration)
        for m in self.model:
            m.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        for i in range(self.cfg.eval_iters):
            total += self.forward_loss(self.valid_ds, self._rows(i * self.cfg.global_batch_size))
        loss = (total[0] / total[1].clamp(min=1)).item()
        return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))}

    def save(self, export: bool = False) -> None:
        """Save a checkpoint; with ``export`` also write ``--save-hf`` / ``--save-hf-adapter``."""
        self.watchdog.phase("save", self.iteration)
        self.checkpointer.save(self, export=export)

    # ------------------------------------------------------------------ loop
    def train(self) -> list[dict[str, Any]]:
        cfg, watchdog = self.cfg, self.watchdog
        stop = StopRequests(cfg, self.info.device, self.started).install()
        self.run_log.open_progress(self.train_iters, self.iteration)
        start_time = time.perf_counter()
        first = self.iteration
        if first >= self.train_iters:
            self.log(f"nothing to train: {cfg.load} is already at iteration {first} = "
                     f"--train-iters {self.train_iters}; pass a larger --train-iters to continue")
        watchdog.start(self.iteration)
        try:
            while self.iteration < self.train_iters:
                step_rows = self.data_position
                watchdog.phase("forward-backward", self.iteration + 1)
                step = self.train_step()
                record = self.run_log.step_record(step, self.iteration,
                                                  self.optimizer.param_groups[0]["lr"],
                                                  self.consumed_samples)
                record.update(self.run_log.device_metrics(step, self.shape, self.train_ds,
                                                          step_rows))
                if self.moe_metrics is not None:
                    record.update(self.moe_metrics.collect(len(self._rows(step_rows))))
                if cfg.eval_interval and self.iteration % cfg.eval_interval == 0:
                    with self.data_parallel.parameters_in_sync():
                        record.update(self.evaluate() or {})
                        if self.eval_generation is not None:
                            record.update(self.eval_generation(self.iteration))
                self.history.append(record)
                self.run_log.record(record, self.train_iters)
                export = self.checkpointer.due(self.iteration, self.train_iters)
                if export is not None:
                    self.save(export=export)
                watchdog.step_done(self.iteration)
                self.stopped_early = stop.reason()  # a signal or the clock, agreed by all ranks
                if self.stopped_early is not None:
                    self.log(self.stopped_early)
                    break
                if cfg.exit_interval and self.iteration % cfg.exit_interval == 0:
                    self.log(f"--exit-interval {cfg.exit_interval}: saving and exiting")
                    break
            if cfg.save and self.iteration > first:
                self.save(export=self.stopped_early is None)  # a stop asks to exit soon
        finally:
            watchdog.stop()
            self.run_log.close()
            stop.restore()
        self.log(f"done: {self.iteration} iterations in {time.perf_counter() - start_time:.1f}s")
        return self.history

    def close(self) -> None:
        """Let go of what this trainer holds so the same process can build another one (the
        test workers run tens of layouts in one launch): the run lock, and the DDP wrappers' hook cycle that would otherwise keep the model and its
        process groups alive. The trainer is unusable afterwards."""
        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()
            self.run_lock = None
        if getattr(self, "data_parallel", None) is not None:
            self.data_parallel.release()
