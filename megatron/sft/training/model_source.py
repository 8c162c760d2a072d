"""Where the trainer's model comes from, decided once: a converted (or fine-tuned) checkpoint,
an HF model directory converted in memory, or a LoRA run (frozen base + adapters).

Every branch on "what is ``--load``" lives here, so the trainer asks one object:

- :meth:`ModelSource.resolve` (before the process group): what ``--load`` is, and the model
  shape. ``--load HF_DIR`` with a ``--save`` that already holds a checkpoint resumes from
  ``--save``, as the recipes do (a re-run of the same command continues), unless ``--finetune``.
- :meth:`ModelSource.describe_layout` (once the layout is known): an HF directory's checkpoint
  metadata at this run's layout.
- :meth:`ModelSource.build` the model chunks (each rank reads its shard), adapters attached
  for a LoRA run (:mod:`megatron.sft.training.lora_model`).
- :meth:`ModelSource.before_save`: what a save needs from the source (the HF source's tokenizer
  and config beside the saves; a LoRA run's base from an HF directory converted once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

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
from megatron.sft.model.builder import build_model_from_checkpoint, build_model_from_hf
from megatron.sft.model.moe.freeze import freeze_moe
from megatron.sft.training import hf_output, lora_model


class ModelSource:
    """The ``--load`` of one run (``cfg.load`` is rewritten to ``--save`` when that resumes)."""

    cfg: Any
    hf_load: bool                       # --load is an HF model directory, converted in memory
    shape: ModelShape
    meta: CheckpointMetadata            # the checkpoint's metadata (an HF dir's: at the layout)
    lora: Any                           # LoRACheckpointInfo when --lora-rank > 0, else None
    lora_resumed: bool                  # --load was a LoRA run (adapters + optimizer from it)

    def __init__(self, cfg):
        self.cfg = cfg
        self.lora, self.lora_resumed = None, False

    # ------------------------------------------------------------------ before the processes
    def resolve(self) -> list[str]:
        """Sets ``hf_load`` and ``shape`` (and ``meta`` for a converted checkpoint); returns
        notes to log once the logger is known. A ``--save`` run that was loaded from another
        HF directory is an error."""
        cfg = self.cfg
        problem = describe_load_problem(cfg.load)
        if problem is not None:
            raise ValueError(problem)
        self.hf_load = is_hf_model_dir(cfg.load)
        notes = self._resume_from_save() if self._save_holds_a_run() else []
        if self.hf_load:  # the metadata follows from the layout (describe_layout)
            _, self.shape = shape_of(load_hf_config(Path(cfg.load)))
        else:
            self.meta = read_metadata(iteration_dir(Path(cfg.load)))
            _, self.shape = shape_of(self.meta.hf_config)
            notes += self._unverified_notes()
        return notes

    def _unverified_notes(self) -> list[str]:
        """An iteration without checksums is loaded with a warning naming it, or refused with
        ``--strict``; ``--no-verify`` asked for no check at all."""
        from megatron.sft.bridge.integrity import unverified_notice

        cfg = self.cfg
        notice = unverified_notice(iteration_dir(Path(cfg.load))) if cfg.verify else None
        if notice is None:
            return []
        if getattr(cfg, "strict", False):
            raise ValueError(f"{notice}. --strict makes this an error: load an iteration that "
                             "has its checksums, or drop --strict to train on it unverified")
        return [f"warning: {notice}; --strict makes this an error"]

    def _save_holds_a_run(self) -> bool:
        cfg = self.cfg
        return bool(self.hf_load and cfg.save and (Path(cfg.save) / TRACKER_FILE).exists()
                    and not cfg.finetune)

    def _resume_from_save(self) -> list[str]:
        cfg = self.cfg
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

    @property
    def resumable(self) -> bool:
        """Whether ``--load`` may hold training state to resume (an HF directory never does)."""
        return not (self.cfg.finetune or self.hf_load)

    # ------------------------------------------------------------------ once the layout is set
    def describe_layout(self, layout, log: Callable[[str], None]) -> None:
        """An HF directory's checkpoint metadata at ``layout`` (a checkpoint's is read
        already)."""
        if self.hf_load:
            from megatron.sft.bridge.hf_source import hf_checkpoint_metadata

            self.meta, _ = hf_checkpoint_metadata(self.cfg.load, layout, log=log)
            log(f"loading the HF model {self.cfg.load} directly at {layout.describe()} (each "
                f"rank reads its shard; vocab padded {self.shape.vocab_size} -> "
                f"{self.meta.padded_vocab_size})")

    @property
    def expert_adapters(self) -> bool:
        """LoRA puts adapters on the routed experts (the experts implementation must allow)."""
        settings = lora_model.settings_from_config(self.cfg, self.shape)
        return settings is not None and bool(settings.expert_targets)

    def check_adapters(self) -> None:
        """A LoRA run is loaded as one, with its adapters' shape."""
        lora_model.check_load(self.cfg, self.shape)

    def build(self, build: dict[str, Any], log: Callable[[str], None]) -> list:
        """The model chunks of this rank (one per virtual stage), not yet wrapped for data
        parallelism; LoRA: frozen base + adapters, before DDP and the optimizer."""
        cfg = self.cfg
        settings = lora_model.settings_from_config(cfg, self.shape)
        if settings is not None:
            chunks, self.meta, self.lora, self.lora_resumed = lora_model.build_lora_model(
                cfg.load, settings, seed=cfg.seed, hf_base=self.hf_load, save=cfg.save, **build)
            log(lora_model.trainable_summary(chunks))
        elif self.hf_load:  # each rank reads its shard of the safetensors
            chunks, self.meta = build_model_from_hf(cfg.load, log=lambda m: None, **build)
        else:  # check_adapters refused a LoRA run without --lora-rank
            chunks, self.meta, _ = build_model_from_checkpoint(cfg.load, **build)
        if settings is None and (cfg.moe_router_freeze or cfg.moe_experts_freeze):
            frozen = freeze_moe(chunks, cfg.moe_router_freeze, cfg.moe_experts_freeze)
            log(f"MoE: {frozen:,} parameters frozen on this rank ("
                + " and ".join(n for n, on in (("routers", cfg.moe_router_freeze),
                                               ("routed experts", cfg.moe_experts_freeze)) if on)
                + ")")
        return chunks

    # ------------------------------------------------------------------ saves
    def before_save(self) -> Optional[Any]:
        """Run on every rank before a checkpoint is written; returns the LoRA info the save
        records (``None`` for full fine-tuning)."""
        from megatron.sft.runtime.collective import on_every_rank

        if self.meta.hf_source:  # the run's HF source: tokenizer and config beside the saves
            import torch.distributed as dist

            on_every_rank(lambda: dist.get_rank() != 0 or hf_output.save_reference_files(
                self.meta.hf_source["path"], self.cfg.save))
        if self.lora is not None and not self.lora.base_fingerprint:  # base from an HF dir
            self.lora = lora_model.write_hf_base(self.lora, self.meta)
        return self.lora
