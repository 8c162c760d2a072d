"""The SFT training loop on megatron-core: model from checkpoint metadata, DDP (+ distributed
optimizer), the real pipeline schedules, per-token loss over the global batch, evaluation,
logging, checkpoints and preemption handling."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from megatron.sft.bridge.architectures import shape_of
from megatron.sft.bridge.checkpoint_io import (
    TRACKER_FILE,
    CheckpointMetadata,
    iteration_dir,
    read_metadata,
)
from megatron.sft.bridge.convert import load_hf_config
from megatron.sft.bridge.hf_source import (
    check_same_source,
    describe_load_problem,
    is_hf_model_dir,
)
from megatron.sft.bridge.model_shape import ModelShape
from megatron.sft.data.sft_dataset import SFTDataset, SFTDatasetConfig, build_sft_datasets, \
    collate_sft
from megatron.sft.runtime.distributed import RuntimeInfo, initialize_distributed
from megatron.sft.model.layer_impl import LayerImpl, resolve_layer_impl
from megatron.sft.runtime.parallel_dims import ParallelDims
from megatron.sft.training.arguments import TE_CP_PIPELINE, TrainConfig
from megatron.sft.training.batch import local_micro_batch, masked_loss_sum
from megatron.sft.training.chunked_loss import (
    chunked_loss_sum,
    defer_output_layer,
    output_weight,
    use_chunked_loss,
)
from megatron.sft.training.checkpointing import (
    load_training_state,
    peek_resume,
    save_checkpoint,
)
from megatron.sft.model.moe import settings as moe
from megatron.sft.training import fsdp, hf_output, lora
from megatron.sft.training.loss import vocab_parallel_token_loss
from megatron.sft.training.metrics import MetricSinks, peak_tflops, training_flops
from megatron.sft.model.builder import build_model_from_checkpoint, build_model_from_hf
from megatron.sft.model.moe.metrics import MoEMetrics, console_summary, moe_metrics_for
from megatron.sft.training.resume import (
    check_optimizer_layout,
    data_identity,
    optimizer_layout,
    plan_resume,
)
from megatron.sft.training.run_guard import (
    acquire_run_lock,
    check_save_directory,
    check_training_data,
)


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
    meta: CheckpointMetadata            # the --load checkpoint's metadata (or an HF dir's)
    hf_load: bool                       # --load is an HF model directory, converted in memory
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
    model: list                         # DDP-wrapped GPTModel chunks (one per virtual stage)
    chunked_loss: bool                  # output layer + loss in chunks (model returns hiddens)
    overlap_param_gather: bool          # parameters reach modules in their forward pre-hooks
    optimizer: Any                      # megatron-core MegatronOptimizer
    lora: Any                           # LoRACheckpointInfo when --lora-rank > 0, else None
    lora_resumed: bool                  # --load was a LoRA run (adapters + optimizer from it)
    scheduler: Any                      # megatron-core OptimizerParamScheduler
    train_ds: SFTDataset
    valid_ds: Optional[SFTDataset]
    sinks: Optional[MetricSinks]
    resume: Any                         # what the --load checkpoint resumes (None: a fresh start)
    plan: Any                           # ResumePlan: data position, schedule decision, notes
    data_identity: dict[str, Any]       # which data the data position points into
    moe_metrics: Optional[MoEMetrics]  # per-layer aux loss / load imbalance (MoE models)
    # --- counters
    train_iters: int                    # computed once, from --train-iters or --train-epochs
    iteration: int
    consumed_samples: int               # samples the LR schedule has seen (every data)
    data_position: int                  # rows of this data consumed (the next step's first row)
    history: list[dict[str, Any]]

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.log = log
        self._log_here = log  # rank 0's voice, for what only rank 0 does (exports)
        self.history = []
        self.iteration = 0
        self.consumed_samples = 0
        self.data_position = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        notes = self._resolve_load()
        if self.hf_load:  # the metadata follows from the layout, once it is set up below
            _, self.shape = shape_of(load_hf_config(Path(cfg.load)))
        else:
            self.meta = read_metadata(iteration_dir(Path(cfg.load)))
            _, self.shape = shape_of(self.meta.hf_config)
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")), self.shape.num_layers)
        moe.check_moe_run(cfg, self.shape)
        self.info = initialize_distributed(cfg.parallel_layout(self.shape.num_layers),
                                           seed=cfg.seed)
        self.run_lock = acquire_run_lock(cfg.save)  # before any rank writes; fails on all ranks
        self.dims = self.info.dims
        self.dp_size, self.dp_rank = self.dims.dp_size, self.dims.dp_rank
        self.is_logger = self.dims.is_logger
        if not self.is_logger:  # one voice
            self.log = lambda message: None
        for note in notes:
            self.log(note)
        check_save_directory(cfg)  # never replace or prune an iteration training did not write
        hf_output.check_hf_outputs(cfg)  # --save-hf: never over files this run did not export
        if self.hf_load:
            from megatron.sft.bridge.hf_source import hf_checkpoint_metadata

            self.meta, _ = hf_checkpoint_metadata(cfg.load, self.dims.layout.for_checkpoint(),
                                                  log=self.log)
            self.log(f"loading the HF model {cfg.load} directly at "
                     f"{self.dims.layout.for_checkpoint().describe()} (each rank reads its "
                     f"shard; vocab padded {self.shape.vocab_size} -> "
                     f"{self.meta.padded_vocab_size})")
        self.impl = resolve_layer_impl(cfg.transformer_impl, cfg.attention_backend,
                                       self.info.device.type, cfg.moe_experts_impl,
                                       torch.bfloat16 if cfg.bf16 else torch.float32,
                                       cp=self.dims.cp_size)
        if self.impl.attention == "te" and self.dims.cp_size > 1 and self.dims.layout.pp > 1:
            raise ValueError(TE_CP_PIPELINE)
        self.log(f"layers: {self.impl.describe()}"
                 + (f", {self.impl.experts} experts" if self.shape.moe else ""))
        lora.check_load(cfg)  # a LoRA run is loaded as one, with its adapters' shape
        self.resume = None if cfg.finetune or self.hf_load else peek_resume(cfg)
        self._build_data()
        cfg.check_schedule(self.train_iters)  # warm-up < iterations, also for --train-epochs
        if self.resume is not None:
            self.plan = plan_resume(
                cfg, iteration=self.resume.iteration, saved_schedule=self.resume.schedule,
                saved_train_state=self.resume.train_state, wanted_schedule=self._schedule(),
                identity=self.data_identity, ckpt=cfg.load)
            self.data_position = self.plan.data_position
            if self.resume.has_optimizer and not cfg.no_load_optim:
                check_optimizer_layout(self.resume.optimizer_layout, optimizer_layout(
                    fsdp=cfg.fsdp_strategy, distributed=cfg.use_distributed_optimizer,
                    shards=self.dp_size * self.dims.layout.cp), cfg.load)
            self.train_ds.extend_to(self.data_position + max(
                self.train_iters - self.resume.iteration, 0) * cfg.global_batch_size)
        check_training_data(self)  # vocabulary, lengths, objective: before building the model
        self._build_model()
        self._build_optimizer()
        self.peak_tflops = (peak_tflops(torch.cuda.get_device_name())
                            if self.info.device.type == "cuda" else None)
        self.sinks = (MetricSinks(cfg.tensorboard_dir, cfg.wandb_project, dataclasses.asdict(cfg))
                      if self.is_logger else None)
        if self.resume is not None:
            load_optim = self.resume.has_optimizer and not cfg.no_load_optim
            state = load_training_state(cfg.load, self.optimizer, self.scheduler,
                                        optimizer_state=load_optim,
                                        override_schedule=self.plan.override_schedule,
                                        verify=cfg.verify, fsdp_model=self.model
                                        if cfg.use_megatron_fsdp else None)
            self.iteration = state["iteration"]
            self.consumed_samples = state.get("consumed_samples", 0)
            for note in self.plan.notes:
                self.log(note)
            fresh = "" if load_optim else (
                f" ({'--no-load-optim' if cfg.no_load_optim else 'a resharded checkpoint'}: "
                "weights, LR schedule and data position carried, the optimizer state starts "
                "fresh)")
            self.log(f"resumed from {cfg.load} at iteration {self.iteration}, data row "
                     f"{self.data_position}{fresh}")

    def _resolve_load(self) -> list[str]:
        """Sets ``hf_load``; returns notes to log. ``--load HF_DIR`` with a ``--save`` that
        already holds a checkpoint resumes from ``--save``, as the recipes do (a re-run of the
        same command continues), unless ``--finetune``; a ``--save`` run that was loaded from
        another HF directory is an error."""
        cfg = self.cfg
        problem = describe_load_problem(cfg.load)
        if problem is not None:
            raise ValueError(problem)
        self.hf_load = is_hf_model_dir(cfg.load)
        if not (self.hf_load and cfg.save and (Path(cfg.save) / TRACKER_FILE).exists()
                and not cfg.finetune):
            return []
        saved = read_metadata(iteration_dir(Path(cfg.save))).hf_source
        if saved and Path(saved["path"]) != Path(cfg.load).resolve():
            raise ValueError(
                f"--save {cfg.save} holds a run loaded from {saved['path']}, but --load is "
                f"{cfg.load}: pass --load {cfg.save} to resume it, or another --save directory "
                "to start a new run")
        load, cfg.load, self.hf_load = cfg.load, cfg.save, False
        notes = [f"--save {cfg.save} already holds a checkpoint: resuming from it (--load {load} "
                 "is where the run started)"]
        changed = check_same_source(saved) if saved else None
        if changed:
            notes.append(f"note: {changed}; the run continues from the weights in --save")
        return notes

    def _schedule(self) -> dict[str, Any]:
        """The LR schedule the flags ask for, in the scheduler's terms (steps are samples)."""
        cfg, gbs = self.cfg, self.cfg.global_batch_size
        warmup = cfg.warmup_iters(self.train_iters)
        return {"max_lr": cfg.lr, "min_lr": cfg.min_lr, "lr_decay_style": cfg.lr_decay_style,
                "lr_warmup_steps": warmup * gbs, "warmup_iters": warmup,
                "lr_decay_steps": max(self.train_iters * gbs, 1), "start_wd": cfg.weight_decay,
                "train_iters": self.train_iters}

    def _build_data(self) -> None:
        """Datasets are built once; ``--train-epochs`` counts one epoch's rows, then the same
        dataset is extended to the iterations it implies."""
        cfg = self.cfg
        data = SFTDatasetConfig(data_path=cfg.data_path, seq_length=cfg.seq_length,
                                seed=cfg.seed, packing=cfg.packing, split=cfg.split,
                                valid_data_path=cfg.valid_data_path)
        if cfg.train_iters is not None:
            self.train_iters = cfg.train_iters
            self.train_ds, self.valid_ds, _ = build_sft_datasets(
                data, train_samples=self.train_iters * cfg.global_batch_size)
        else:
            self.train_ds, self.valid_ds, _ = build_sft_datasets(data)
            self.train_iters = max(1, math.ceil(self.train_ds.epoch_rows * cfg.train_epochs
                                                / cfg.global_batch_size))
            self.train_ds.extend_to(self.train_iters * cfg.global_batch_size)
        self.data_identity = data_identity(cfg, Path(self.train_ds.prefix + "_stats.json"))
        self.log(f"train rows {len(self.train_ds)} (packing efficiency "
                 f"{self.train_ds.efficiency:.1%}), valid rows "
                 f"{len(self.valid_ds) if self.valid_ds else 0}")

    def _build_model(self) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        cfg = self.cfg
        overrides: dict[str, Any] = dict(calculate_per_token_loss=True,
                                         sequence_parallel=cfg.sequence_parallel,
                                         **moe.moe_config_overrides(cfg, self.shape))
        if cfg.recompute_granularity:
            overrides.update(recompute_granularity=cfg.recompute_granularity)
            if cfg.recompute_granularity == "full":
                overrides.update(recompute_method="uniform", recompute_num_layers=1)
        build = dict(impl=self.impl, params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                     seq_length=cfg.seq_length, verify=cfg.verify, **overrides)
        # --- LoRA (training/lora.py): frozen base + adapters, before DDP and the optimizer
        self.lora, self.lora_resumed = None, False
        settings = lora.settings_from_config(cfg)
        if settings is not None:
            chunks, self.meta, self.lora, self.lora_resumed = lora.build_lora_model(
                cfg.load, settings, seed=cfg.seed, hf_base=self.hf_load, save=cfg.save, **build)
            self.log(lora.trainable_summary(chunks))
        elif self.hf_load:  # each rank reads its shard of the safetensors
            chunks, self.meta = build_model_from_hf(cfg.load, log=lambda m: None, **build)
        else:  # setup refused a LoRA run without --lora-rank
            chunks, self.meta, _ = build_model_from_checkpoint(cfg.load, **build)
        tcfg = chunks[0].config
        self.moe_metrics = moe_metrics_for(chunks, self.shape, self.dims, tcfg)
        self.chunked_loss = use_chunked_loss(
            cfg.chunked_loss, cfg.micro_batch_size * cfg.seq_length // self.dims.cp_size,
            self.meta.padded_vocab_size, self.dims.layout.tp)
        if self.chunked_loss:
            defer_output_layer(chunks)
        # Data-parallel communication overlaps compute by default when there is any: gradients
        # are reduced bucket by bucket during the backward pass, and with the distributed
        # optimizer the updated parameters are gathered bucket by bucket during the next forward.
        overlap_grads = self.dp_size > 1 and cfg.overlap_grad_reduce
        overlap_params = overlap_grads and cfg.use_distributed_optimizer and \
            cfg.overlap_param_gather
        if cfg.use_megatron_fsdp:  # training/fsdp.py; it gathers parameters in its own hooks
            self.model = fsdp.wrap(chunks, tcfg, cfg.fsdp_strategy, device=self.info.device,
                                   overlap_grad_reduce=overlap_grads)
            overlap_grads = self.model[0].ddp_config.overlap_grad_reduce and self.dp_size > 1
            overlap_params = False
        else:
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grads,
                overlap_param_gather=overlap_params,
                use_distributed_optimizer=cfg.use_distributed_optimizer,
                average_in_collective=False)
            self.model = [DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=m,
                                                  disable_bucketing=i > 0)
                          for i, m in enumerate(chunks)]
        tcfg.finalize_model_grads_func = finalize_model_grads

        def per_chunk(name: str):
            funcs = [getattr(m, name) for m in self.model]
            return funcs if len(funcs) > 1 else funcs[0]

        if overlap_grads:  # the pipeline schedules start each chunk's reduction when it is done
            tcfg.no_sync_func = per_chunk("no_sync")
            tcfg.grad_sync_func = per_chunk("start_grad_sync")
        if overlap_params:
            tcfg.param_sync_func = per_chunk("start_param_sync")
        self.overlap_param_gather = overlap_params
        self.tconfig = tcfg

    def _build_optimizer(self) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.cfg
        ocfg = OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad, bf16=cfg.bf16, params_dtype=torch.bfloat16 if cfg.bf16
            else torch.float32,
            use_distributed_optimizer=cfg.use_distributed_optimizer or cfg.use_megatron_fsdp)
        self.optimizer = get_megatron_optimizer(ocfg, self.model)
        self.tconfig.grad_scale_func = self.optimizer.scale_loss
        gbs, warmup = cfg.global_batch_size, cfg.warmup_iters(self.train_iters)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if warmup else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
            lr_warmup_steps=warmup * gbs, lr_decay_steps=max(self.train_iters * gbs, 1),
            lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay, wd_incr_steps=self.train_iters * gbs,
            wd_incr_style="constant")

    # ------------------------------------------------------------------ steps
    def _microbatches(self, dataset, rows: list[list[int]]) -> list[dict[str, Any]]:
        device = self.info.device
        out = []
        for micro in rows:
            batch = collate_sft([dataset[r % len(dataset)] for r in micro])
            batch = {k: v.to(device) for k, v in batch.items()}
            attention = self.impl.attention_inputs(
                batch["cu_seqlens"] if self.cfg.packing else None, len(micro),
                self.cfg.seq_length, self.shape.sliding_window, cp_size=self.dims.cp_size,
                cp_rank=self.dims.cp_rank)
            batch = local_micro_batch(batch, attention.local_index)  # this CP rank's tokens
            batch["attention"] = attention
            out.append(batch)
        return out

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        tokens, positions, labels = batch["tokens"], batch["position_ids"], batch["labels"]
        attention = batch["attention"]
        # MoE: the routing padding mask (megatron-core's padding_mask), {} for dense models
        extra = moe.routing_inputs(batch, self.shape, model, attention.flatten_rows,
                                   self.tconfig.sequence_parallel)
        if attention.flatten_rows:  # [b, s] -> [1, b*s]: one THD sequence
            tokens, positions = tokens.reshape(1, -1), positions.reshape(1, -1)
        output = model(tokens, positions, attention_mask=attention.attention_mask,
                       packed_seq_params=attention.packed_seq_params, **extra)
        vocab = self.shape.vocab_size

        def loss_func(output_tensor):
            if attention.flatten_rows:
                output_tensor = output_tensor.reshape(labels.shape + output_tensor.shape[-1:])
            if self.chunked_loss:  # output_tensor is the final hidden states
                loss_sum, count = chunked_loss_sum(
                    output_tensor, output_weight(model), labels, batch["loss_mask"], vocab,
                    sequence_parallel=self.tconfig.sequence_parallel, tp_rank=self.dims.tp_rank,
                    tp_group=self.dims.tp_group())
            else:
                per_token = vocab_parallel_token_loss(output_tensor, labels, vocab)
                loss_sum, count = masked_loss_sum(per_token, batch["loss_mask"])
            return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(),
                                                             count.to(loss_sum.dtype)])}

        return output, loss_func

    def forward_loss(self, dataset, rows: list[list[int]], forward_only: bool = True
                     ) -> torch.Tensor:
        """``[loss_sum, token_count]`` of these micro-batches (this DP rank's rows), summed over
        micro-batches and data-parallel ranks, on every rank; with ``forward_only=False`` the
        gradients are accumulated into the model's buffers as in a training step."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        micro = self._microbatches(dataset, rows)
        iters = [iter(micro) for _ in self.model]
        out = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iters if len(self.model) > 1 else iters[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(micro), seq_length=self.cfg.seq_length,
            micro_batch_size=self.cfg.micro_batch_size, forward_only=forward_only)
        total = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        if self.dims.is_last_stage:
            for item in out:
                total += item["lm loss"].to(total)
        for group in self.dims.loss_groups():
            torch.distributed.all_reduce(total, group=group)
        return total

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
        for m in self.model:
            m.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        for i in range(self.cfg.eval_iters):
            total += self.forward_loss(self.valid_ds, self._rows(i * self.cfg.global_batch_size))
        loss = (total[0] / total[1].clamp(min=1)).item()
        return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))}

    # ------------------------------------------------------------------ loop
    @contextlib.contextmanager
    def _parameters_in_sync(self):
        """With overlapped parameter gathering the newest weights reach a module only in its
        next forward pre-hook; saving or evaluating first gathers them all, then re-arms the
        hooks."""
        if not self.overlap_param_gather:
            yield
            return
        for m in self.model:
            m.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for m in self.model:
                m.enable_forward_pre_hook()

    def save(self, export: bool = False) -> None:
        """Save a checkpoint; with ``export`` also write ``--save-hf`` / ``--save-hf-adapter``
        from it (``training/hf_output.py``)."""
        with self._parameters_in_sync():
            self._save()
        if export and (self.cfg.save_hf or self.cfg.save_hf_adapter):
            self._export_hf()

    def _export_hf(self) -> None:
        """Rank 0 exports the iteration just saved; the others wait for it (and hear its
        error)."""
        import torch.distributed as dist

        from megatron.sft.runtime.collective import on_every_rank

        cfg = self.cfg
        adapter = cfg.save_hf_adapter if self.lora is not None else None
        on_every_rank(lambda: dist.get_rank() != 0 or hf_output.export_iteration(
            cfg.save, self.iteration, cfg.save_hf, adapter, self._log_here))

    def _save(self) -> None:
        from megatron.sft.runtime.collective import on_every_rank

        if self.meta.hf_source:  # the run's HF source: tokenizer and config beside the saves
            import torch.distributed as dist

            on_every_rank(lambda: dist.get_rank() != 0 or hf_output.save_reference_files(
                self.meta.hf_source["path"], self.cfg.save))
        if self.lora is not None and not self.lora.base_fingerprint:  # base from an HF dir
            self.lora = lora.write_hf_base(self.lora, self.meta)
        train_state = {"consumed_samples": self.consumed_samples,
                       "data_position": self.data_position,
                       "data": {**self.data_identity,
                                "global_batch_size": self.cfg.global_batch_size}}
        path = save_checkpoint(self.cfg.save, self.iteration, self.model, self.optimizer,
                               self.scheduler, self.meta, self.impl, train_state,
                               self.cfg.keep_last, lora=self.lora)
        self.log(f"saved checkpoint {path}")

    def train(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        stop = {"signal": None}

        def on_signal(signum, frame):
            stop["signal"] = signum

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = None
        if self.is_logger and not cfg.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=self.train_iters, initial=self.iteration, unit="it", desc="train")
        start_time = time.perf_counter()
        first = self.iteration
        if first >= self.train_iters:
            self.log(f"nothing to train: {cfg.load} is already at iteration {first} = "
                     f"--train-iters {self.train_iters}; pass a larger --train-iters to continue")
        try:
            while self.iteration < self.train_iters:
                step_rows = self.data_position
                step = self.train_step()
                record = {"iteration": self.iteration, "loss": step.loss,
                          "lr": self.optimizer.param_groups[0]["lr"],
                          "grad_norm": None if step.grad_norm is None else float(step.grad_norm),
                          "consumed_samples": self.consumed_samples, "loss_tokens": step.tokens,
                          "ms_per_iter": step.seconds * 1e3,
                          "tokens_per_s": cfg.global_batch_size * cfg.seq_length / step.seconds,
                          "skipped": step.skipped}
                record.update(self._device_metrics(step, step_rows))
                if self.moe_metrics is not None:
                    record.update(self.moe_metrics.collect(len(self._rows(step_rows))))
                if cfg.eval_interval and self.iteration % cfg.eval_interval == 0:
                    with self._parameters_in_sync():
                        record.update(self.evaluate() or {})
                self.history.append(record)
                self._record(record)
                if self.iteration % cfg.log_interval == 0 or self.iteration == self.train_iters:
                    self._log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{step.loss:.4f}")
                export = bool(cfg.save_hf_interval
                              and self.iteration % cfg.save_hf_interval == 0)
                if cfg.save and self.iteration < self.train_iters and (export or (
                        cfg.save_interval and self.iteration % cfg.save_interval == 0)):
                    self.save(export=export)
                if stop["signal"] is not None:
                    self.log(f"received signal {stop['signal']}: saving and exiting")
                    break
                if cfg.exit_interval and self.iteration % cfg.exit_interval == 0:
                    self.log(f"--exit-interval {cfg.exit_interval}: saving and exiting")
                    break
            if cfg.save and self.iteration > first:
                self.save(export=stop["signal"] is None)  # a signal asks to exit soon
        finally:
            if bar is not None:
                bar.close()
            if self.sinks is not None:
                self.sinks.close()
            for s, h in previous.items():
                signal.signal(s, h)
        self.log(f"done: {self.iteration} iterations in {time.perf_counter() - start_time:.1f}s")
        return self.history

    def _device_metrics(self, step: StepResult, first_row: int) -> dict[str, float]:
        """TFLOP/s per GPU, MFU and peak memory on GPU. Model FLOPs of the global batch's real
        documents (attention per document, padding not counted), see ``training_flops``."""
        if self.info.device.type != "cuda":
            return {}
        gbs = self.cfg.global_batch_size
        ds = self.train_ds
        lengths = [n for r in range(first_row, first_row + gbs)
                   for n in ds.document_lengths(r % len(ds)).tolist()]
        world = torch.distributed.get_world_size()
        tflops = training_flops(self.shape, lengths) / step.seconds / world / 1e12
        out = {"tflops_per_gpu": tflops,
               "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
        return out

    def _record(self, record: dict[str, Any]) -> None:
        """Every iteration goes to the JSON log and TensorBoard/W&B; the console gets every
        ``--log-interval``-th."""
        if not self.is_logger:
            return
        if self.sinks is not None:
            self.sinks.log(record)
        if self.cfg.log_json:
            with open(self.cfg.log_json, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_logger:
            return
        parts = [f"iter {record['iteration']}/{self.train_iters}",
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
        self.log(" | ".join(parts))
