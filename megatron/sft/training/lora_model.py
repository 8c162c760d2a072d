"""LoRA in training: which checkpoint the base comes from, and the model built from it with
adapters attached (the adapters themselves, their checkpoint format and their export live in
the :mod:`megatron.sft.lora` package).

Where the model comes from:

- ``--load BASE`` (a converted or fully fine-tuned checkpoint, no ``lora.json``): the base is
  built from it, adapters start fresh (A random, B zero: the model starts as the base), and
  the optimizer starts fresh even if BASE holds one (it is for other parameters).
- ``--load HF_DIR`` (an HF model directory): the base is built from it in memory, as for
  full fine-tuning; the first save converts it once into ``SAVE/base`` (the converter's files,
  which the loaded base equals bit for bit), and ``lora.json`` names that, so merged and PEFT
  export, reshard and resume read the base as for any LoRA run. (Naming the HF directory
  itself would need an HF-reading base in each of those; not done.)
- ``--load RUN`` (a LoRA run's ``--save`` dir): ``RUN/iter_N/lora.json`` names the base; the
  base is rebuilt from it (after checking it has not changed), the adapters are loaded from RUN,
  and the trainer resumes optimizer and schedule from RUN unless ``--finetune``.
"""

from __future__ import annotations

import dataclasses
import json
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
from megatron.sft.model.layer_impl import LayerImpl
from megatron.sft.model.builder import build_model_from_checkpoint, build_model_from_hf

#: where a LoRA run loaded from an HF directory keeps its converted base (``--save``/base)
HF_BASE_DIR = "base"
HF_BASE_SOURCE = "hf_source.json"


def settings_from_config(cfg, shape=None) -> Optional[LoRASettings]:
    """The run's LoRA settings; a Mixture-of-Experts ``shape`` gives its routed experts
    adapters unless ``--moe-experts-freeze``."""
    if not cfg.lora_rank:
        return None
    experts = shape is not None and shape.moe is not None and not cfg.moe_experts_freeze
    return LoRASettings.from_flags(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                   cfg.lora_target_modules, routed_experts=experts)


def check_load(cfg, shape=None) -> None:
    """Before anything is built: a LoRA run must be loaded as one, with its adapters' shape."""
    from megatron.sft.bridge.hf_source import is_hf_model_dir

    settings = settings_from_config(cfg, shape)
    if is_hf_model_dir(cfg.load):
        return  # an HF model is never a LoRA run
    if settings is None:
        refuse_lora_checkpoint(cfg.load)
        return
    run = read_lora_info(iteration_dir(Path(cfg.load)))
    if run is not None:
        _check_same_adapters(cfg.load, run, settings)


def _check_same_adapters(load: str, run: LoRACheckpointInfo, settings: LoRASettings) -> None:
    if not run.settings.same_shape(settings):
        def experts(s):
            return ", routed experts " + ("on" if s.expert_targets else "off")

        raise CheckpointError(
            f"{load} holds LoRA adapters with rank {run.settings.rank}, alpha "
            f"{run.settings.alpha}, targets {','.join(run.settings.targets)}"
            f"{experts(run.settings)}, but this run asks for rank {settings.rank}, alpha "
            f"{settings.alpha}, targets {','.join(settings.targets)}{experts(settings)}; pass "
            "the run's --lora-* values (and --moe-experts-freeze for a run whose routed experts "
            "have no adapters)")


def refuse_lora_checkpoint(load: str) -> None:
    """A LoRA run loaded without ``--lora-rank`` would silently train its base; say so."""
    info = read_lora_info(iteration_dir(Path(load)))
    if info is not None:
        s = info.settings
        raise CheckpointError(
            f"{load} is a LoRA run (adapters only, base {info.base_checkpoint}); resume it with "
            f"--lora-rank {s.rank} --lora-alpha {s.alpha} --lora-target-modules "
            f"{','.join(s.targets)}, or export it merged with merge_and_export.sh first")


def refuse_lora_on_mla(meta: CheckpointMetadata) -> None:
    """LoRA targets q/k/v attention's ``linear_qkv``; multi-latent attention has none."""
    from megatron.sft.bridge.architectures import shape_of

    if shape_of(meta.hf_config)[1].mla is not None:
        raise CheckpointError(f"--lora-rank: LoRA on multi-latent attention ({meta.architecture})"
                              " is not supported; train the model in full (--lora-rank 0)")


def build_lora_model(load: str, settings: LoRASettings, impl: LayerImpl, seed: int,
                     hf_base: bool = False, save: Optional[str] = None,
                     **build_kwargs: Any) -> tuple[list, CheckpointMetadata, LoRACheckpointInfo,
                                                   bool]:
    """``(chunks, meta, info, resumed)``: the base built from the right checkpoint with frozen
    weights, adapters attached and initialised or loaded; ``resumed`` is true when ``load`` is
    a LoRA run (then its optimizer state is the adapters'). ``hf_base``: ``load`` is an HF
    directory; ``info`` then names ``save``/base with no fingerprint yet (:func:`write_hf_base`
    writes it at the first save)."""
    if hf_base:
        chunks, meta = build_model_from_hf(load, impl=impl, log=lambda m: None, **build_kwargs)
        refuse_lora_on_mla(meta)
        base = Path(save or ".").resolve() / HF_BASE_DIR
        info = LoRACheckpointInfo(settings, str(base), 1, "")
        attach_lora(chunks, settings)
        init_adapters(chunks, settings, seed)
        return chunks, meta, info, False
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
    refuse_lora_on_mla(meta)
    attach_lora(chunks, settings)
    init_adapters(chunks, settings, seed)
    if run is not None:
        on_every_rank(lambda: load_adapters(chunks, load_iter, meta,
                                            verify=build_kwargs.get("verify", True)))
    return chunks, meta, info, run is not None


def write_hf_base(info: LoRACheckpointInfo, meta: CheckpointMetadata) -> LoRACheckpointInfo:
    """At a LoRA run's first save, when its base came from an HF directory: convert that
    directory once into ``info.base_checkpoint`` (rank 0; the others wait) and return ``info``
    with the base's fingerprint. A base directory already there is reused when it is the
    conversion of the same HF files, else refused."""
    import torch
    import torch.distributed as dist

    from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron

    base = Path(info.base_checkpoint)
    source = meta.hf_source

    def write() -> str:
        if dist.get_rank() != 0:
            return ""
        marker = base / HF_BASE_SOURCE
        if base.exists():
            recorded = json.loads(marker.read_text()) if marker.is_file() else None
            if recorded is None or recorded["fingerprint"] != source["fingerprint"]:
                raise CheckpointError(
                    f"{base} exists but is not the conversion of {source['path']} that this "
                    "LoRA run's base comes from; remove it, or pass another --save")
        else:
            convert_hf_to_megatron(source["path"], base, ConvertOptions(
                layout=meta.layout, make_vocab_size_divisible_by=meta.make_vocab_size_divisible_by,
                params_dtype=getattr(torch, meta.params_dtype), progress=False))
            marker.write_text(json.dumps(source, indent=2) + "\n")
        return base_fingerprint(iteration_dir(base, 1))

    return dataclasses.replace(info, base_fingerprint=on_every_rank(write) or "pending")


def trainable_summary(chunks: list) -> str:
    train = sum(p.numel() for p in adapter_parameters(chunks))
    total = sum(p.numel() for c in chunks for p in c.parameters())
    return f"LoRA: {train:,} trainable of {total:,} parameters on this rank ({train / total:.2%})"
