"""LoRA in training: which checkpoint the base comes from, and the model built from it with
adapters attached (the adapters themselves, their checkpoint format and their export live in
the :mod:`megatron.sft.lora` package).

Where the model comes from:

- ``--load BASE`` (a converted or fully fine-tuned checkpoint, no ``lora.json``): the base is
  built from it, adapters start fresh (A random, B zero: the model starts as the base), and
  the optimizer starts fresh even if BASE holds one (it is for other parameters).
- ``--load RUN`` (a LoRA run's ``--save`` dir): ``RUN/iter_N/lora.json`` names the base; the
  base is rebuilt from it (after checking it has not changed), the adapters are loaded from RUN,
  and the trainer resumes optimizer and schedule from RUN unless ``--finetune``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from megatron.sft.bridge.checkpoint_io import (
    CheckpointError,
    CheckpointMetadata,
    iteration_dir,
    read_metadata,
)
from megatron.sft.lora.adapters import (
    adapter_parameters,
    attach_lora,
    init_adapters,
    load_adapters,
)
from megatron.sft.lora.run_format import (
    LoRACheckpointInfo,
    base_fingerprint,
    check_base,
    read_lora_info,
)
from megatron.sft.lora.settings import LoRASettings
from megatron.sft.runtime.collective import on_every_rank
from megatron.sft.runtime.layer_impl import LayerImpl
from megatron.sft.training.model_builder import build_model_from_checkpoint


def settings_from_config(cfg) -> Optional[LoRASettings]:
    if not cfg.lora_rank:
        return None
    return LoRASettings.from_flags(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                   cfg.lora_target_modules)


def check_load(cfg) -> None:
    """Before anything is built: a LoRA run must be loaded as one, with its adapters' shape."""
    settings = settings_from_config(cfg)
    if settings is None:
        refuse_lora_checkpoint(cfg.load)
        return
    run = read_lora_info(iteration_dir(Path(cfg.load)))
    if run is not None:
        _check_same_adapters(cfg.load, run, settings)


def _check_same_adapters(load: str, run: LoRACheckpointInfo, settings: LoRASettings) -> None:
    if not run.settings.same_shape(settings):
        raise CheckpointError(
            f"{load} holds LoRA adapters with rank {run.settings.rank}, alpha "
            f"{run.settings.alpha}, targets {','.join(run.settings.targets)}, but this run "
            f"asks for rank {settings.rank}, alpha {settings.alpha}, targets "
            f"{','.join(settings.targets)}; pass the run's --lora-* values")


def refuse_lora_checkpoint(load: str) -> None:
    """A LoRA run loaded without ``--lora-rank`` would silently train its base; say so."""
    info = read_lora_info(iteration_dir(Path(load)))
    if info is not None:
        s = info.settings
        raise CheckpointError(
            f"{load} is a LoRA run (adapters only, base {info.base_checkpoint}); resume it with "
            f"--lora-rank {s.rank} --lora-alpha {s.alpha} --lora-target-modules "
            f"{','.join(s.targets)}, or export it merged with merge_and_export.sh first")


def build_lora_model(load: str, settings: LoRASettings, impl: LayerImpl, seed: int,
                     **build_kwargs: Any) -> tuple[list, CheckpointMetadata, LoRACheckpointInfo,
                                                   bool]:
    """``(chunks, meta, info, resumed)``: the base built from the right checkpoint with frozen
    weights, adapters attached and initialised or loaded; ``resumed`` is true when ``load`` is
    a LoRA run (then its optimizer state is the adapters')."""
    load_iter = iteration_dir(Path(load))
    run = read_lora_info(load_iter)
    if run is None:
        base_dir = load_iter
        info = LoRACheckpointInfo(settings, str(Path(load).resolve()),
                                  int(load_iter.name.split("_")[1]), base_fingerprint(load_iter))
    else:
        _check_same_adapters(load, run, settings)
        base_dir = check_base(run, read_metadata(load_iter), Path(load))
        info = LoRACheckpointInfo(settings, run.base_checkpoint, run.base_iteration,
                                  run.base_fingerprint)
    chunks, meta, _ = build_model_from_checkpoint(base_dir.parent,
                                                  int(base_dir.name.split("_")[1]), impl=impl,
                                                  **build_kwargs)
    attach_lora(chunks, settings)
    init_adapters(chunks, settings, seed)
    if run is not None:
        on_every_rank(lambda: load_adapters(chunks, load_iter, meta,
                                            verify=build_kwargs.get("verify", True)))
    return chunks, meta, info, run is not None


def trainable_summary(chunks: list) -> str:
    train = sum(p.numel() for p in adapter_parameters(chunks))
    total = sum(p.numel() for c in chunks for p in c.parameters())
    return f"LoRA: {train:,} trainable of {total:,} parameters on this rank ({train / total:.2%})"
