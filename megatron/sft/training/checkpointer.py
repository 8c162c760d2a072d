"""The run's checkpoints, as one component that decides its own "when": what ``--load``
resumes (peeked before the data is built, restored once the optimizer exists), which
iterations are saved (``--save-interval``, ``--save-hf-interval``, the end, a signal), and the
``--save-hf`` / ``--save-hf-adapter`` exports written from a saved iteration."""

from __future__ import annotations

from typing import Any, Callable, Optional

from megatron.sft.model.moe.experts import trains_grouped_experts
from megatron.sft.training import hf_output
from megatron.sft.training.checkpointing import (
    load_training_state,
    peek_resume,
    save_checkpoint,
)
from megatron.sft.training.optimizer import wanted_schedule
from megatron.sft.training.resume import (
    apply_optimizer_settings,
    check_optimizer_layout,
    optimizer_layout,
    plan_resume,
)


class Checkpointer:
    resume: Any                         # what the --load checkpoint resumes (None: a fresh start)
    plan: Any                           # ResumePlan: data position, schedule decision, notes

    def __init__(self, cfg, source, log: Callable[[str], None], log_here: Callable[[str], None]):
        self.cfg, self.source, self.log, self.log_here = cfg, source, log, log_here
        self.resume = peek_resume(cfg) if source.resumable else None
        self.plan = None
        self._saved: tuple = (None, False)  # (iteration saved last, exported too)

    @property
    def start_iteration(self) -> int:
        """The iteration this run resumes at (0 for a fresh start)."""
        return self.resume.iteration if self.resume is not None else 0

    # ------------------------------------------------------------------ resume
    def plan_resume(self, trainer) -> None:
        """Once the data is built: the data position to continue from, the schedule decision,
        and the optimizer layout check; extends the training data to the remaining
        iterations."""
        if self.resume is None:
            return
        cfg = self.cfg
        self.plan = plan_resume(
            cfg, iteration=self.resume.iteration, saved_schedule=self.resume.schedule,
            saved_train_state=self.resume.train_state,
            wanted_schedule=wanted_schedule(cfg, trainer.train_iters),
            identity=trainer.data_identity, ckpt=cfg.load,
            saved_optimizer=self.resume.optimizer_settings if self.resume.has_optimizer
            and not cfg.no_load_optim else None)
        trainer.data_position = self.plan.data_position
        if self.resume.has_optimizer and not cfg.no_load_optim:
            # the sharding here, before the model is built; the experts' form once it is
            saved = {k: v for k, v in (self.resume.optimizer_layout or {}).items()
                     if k != "experts"}
            check_optimizer_layout(saved or None, self._optimizer_layout(trainer, False),
                                   cfg.load)
        trainer.train_ds.extend_to(trainer.data_position + max(
            trainer.train_iters - self.resume.iteration, 0) * cfg.global_batch_size)

    def _optimizer_layout(self, trainer, grouped_experts: bool) -> dict[str, Any]:
        cfg = self.cfg
        return optimizer_layout(fsdp=cfg.fsdp_strategy, distributed=cfg.use_distributed_optimizer,
                                shards=trainer.dp_size * trainer.dims.layout.cp,
                                grouped_experts=grouped_experts)

    def restore(self, trainer) -> None:
        """Optimizer (unless ``--no-load-optim`` or resharded), LR schedule, RNG and counters
        from ``--load`` (the weights were loaded when the model was built)."""
        if self.resume is None:
            return
        cfg = self.cfg
        load_optim = self.resume.has_optimizer and not cfg.no_load_optim
        if load_optim:
            check_optimizer_layout(self.resume.optimizer_layout, self._optimizer_layout(
                trainer, trains_grouped_experts(trainer.model)), cfg.load)
        state = load_training_state(cfg.load, trainer.optimizer, trainer.scheduler,
                                    optimizer_state=load_optim,
                                    override_schedule=self.plan.override_schedule,
                                    verify=cfg.verify, fsdp_model=trainer.model
                                    if cfg.use_megatron_fsdp else None)
        if load_optim:  # the flags' Adam settings the plan took (--override-opt-param-scheduler)
            apply_optimizer_settings(trainer.optimizer, self.plan.optimizer_overrides)
        trainer.iteration = state["iteration"]
        trainer.consumed_samples = state.get("consumed_samples", 0)
        for note in self.plan.notes:
            self.log(note)
        fresh = "" if load_optim else (
            f" ({'--no-load-optim' if cfg.no_load_optim else 'a resharded checkpoint'}: "
            "weights, LR schedule and data position carried, the optimizer state starts "
            "fresh)")
        self.log(f"resumed from {cfg.load} at iteration {trainer.iteration}, data row "
                 f"{trainer.data_position}{fresh}")

    # ------------------------------------------------------------------ saves
    def due(self, iteration: int, train_iters: int) -> Optional[bool]:
        """After training iteration ``iteration``: ``None`` when no save is due, else whether
        the save also exports (``--save-hf-interval``). The last iteration is saved by
        :meth:`save_at_end`."""
        cfg = self.cfg
        export = bool(cfg.save_hf_interval and iteration % cfg.save_hf_interval == 0)
        if cfg.save and iteration < train_iters and (export or (
                cfg.save_interval and iteration % cfg.save_interval == 0)):
            return export
        return None

    def save(self, trainer, export: bool = False) -> None:
        """Save a checkpoint; with ``export`` also write ``--save-hf`` / ``--save-hf-adapter``
        from it (``training/hf_output.py``). An iteration saved already (an interval save, then
        a signal or --exit-interval at the same iteration) is not written twice."""
        if self._saved[0] != trainer.iteration:
            with trainer.data_parallel.parameters_in_sync():
                self._save(trainer)
            self._saved = (trainer.iteration, False)
        if export and not self._saved[1] and (self.cfg.save_hf or self.cfg.save_hf_adapter):
            self._export_hf(trainer.iteration)
            self._saved = (trainer.iteration, True)

    def _save(self, trainer) -> None:
        lora = self.source.before_save()
        train_state = {"consumed_samples": trainer.consumed_samples,
                       "data_position": trainer.data_position,
                       "data": {**trainer.data_identity,
                                "global_batch_size": self.cfg.global_batch_size}}
        path = save_checkpoint(self.cfg.save, trainer.iteration, trainer.model,
                               trainer.optimizer, trainer.scheduler, self.source.meta,
                               trainer.impl, train_state, self.cfg.keep_last, lora=lora)
        self.log(f"saved checkpoint {path}")

    def _export_hf(self, iteration: int) -> None:
        """Rank 0 exports the iteration just saved; the others wait for it (and hear its
        error)."""
        import torch.distributed as dist

        from megatron.sft.runtime.collective import on_every_rank

        cfg = self.cfg
        adapter = cfg.save_hf_adapter if self.source.lora is not None else None
        on_every_rank(lambda: dist.get_rank() != 0 or hf_output.export_iteration(
            cfg.save, iteration, cfg.save_hf, adapter, self.log_here))
