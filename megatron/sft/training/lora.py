"""LoRA training: build the frozen base with adapters, initialise them independently of the
parallel layout, save and resume adapters only.

Where the model comes from:

- ``--load BASE`` (a converted or fully fine-tuned checkpoint, no ``lora.json``): the base is
  built from it, adapters start fresh (A random, B zero: the model starts as the base), and
  the optimizer starts fresh even if BASE holds one (it is for other parameters).
- ``--load RUN`` (a LoRA run's ``--save`` dir): ``RUN/iter_N/lora.json`` names the base; the
  base is rebuilt from it (after checking it has not changed), the adapters are loaded from RUN,
  and the trainer resumes optimizer and schedule from RUN unless ``--finetune``.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Optional

import torch

from megatron.sft.bridge import transforms as T
from megatron.sft.bridge.checkpoint_io import (
    CheckpointError,
    CheckpointMetadata,
    iteration_dir,
    load_rank_state,
    read_metadata,
)
from megatron.sft.bridge.lora_export import (
    LoRACheckpointInfo,
    base_fingerprint,
    check_base,
    read_lora_info,
)
from megatron.sft.runtime.layer_impl import LayerImpl
from megatron.sft.runtime.lora import (
    LORA_TARGETS,
    LoRASettings,
    adapter_parameters,
    attach_lora,
    is_adapter_name,
    iter_targets,
)
from megatron.sft.training.model_builder import build_model_from_checkpoint


def settings_from_config(cfg) -> Optional[LoRASettings]:
    if not cfg.lora_rank:
        return None
    return LoRASettings.from_flags(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                   cfg.lora_target_modules)


def refuse_lora_checkpoint(load: str) -> None:
    """A LoRA run loaded without ``--lora-rank`` would silently train its base; say so."""
    info = read_lora_info(iteration_dir(Path(load)))
    if info is not None:
        s = info.settings
        raise CheckpointError(
            f"{load} is a LoRA run (adapters only, base {info.base_checkpoint}); resume it with "
            f"--lora-rank {s.rank} --lora-alpha {s.alpha} --lora-target-modules "
            f"{','.join(s.targets)}, or export it merged with merge_and_export.sh first")


@torch.no_grad()
def init_adapters(chunks: list, settings: LoRASettings, seed: int, b_std: float = 0.0) -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5), as peft), B = 0, or
    B ~ N(0, b_std) when ``b_std > 0`` (tests: makes the adapter path count from step 0).

    Each adapter's full tensors are drawn from a generator seeded by (seed, global layer,
    target) and then split like the base, so every TP/PP layout trains the same model.
    """
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    names = list(LORA_TARGETS)
    for layer_number, name, base in iter_targets(chunks, settings.targets):
        ad = base.lora
        gen = torch.Generator().manual_seed(
            zlib.crc32(f"{seed}/{layer_number}/{names.index(name)}".encode()))
        column = LORA_TARGETS[name] == "column"
        r, in_full = ad.A.shape[0], ad.A.shape[1] * (1 if column else tp)
        out_full = ad.B.shape[0] * (tp if column else 1)
        bound = 1.0 / in_full ** 0.5
        a = torch.rand(r, in_full, generator=gen) * 2 * bound - bound
        b = (torch.randn(out_full, r, generator=gen) * b_std if b_std > 0
             else torch.zeros(out_full, r))
        if column:
            # fc1's rows are [gate_shard; up_shard] per rank; QKV's are in one fused order.
            b = (T.fuse_gate_up(*torch.chunk(b, 2, 0), tp)[rank] if name == "linear_fc1"
                 else T.split_tp(b, tp, 0)[rank])
        else:
            a = T.split_tp(a, tp, 1)[rank]
        ad.A.copy_(a)
        ad.B.copy_(b)


def _load_adapters(chunks: list, iter_dir: Path, meta: CheckpointMetadata) -> None:
    from megatron.core import parallel_state as ps

    state = load_rank_state(iter_dir, ps.get_tensor_model_parallel_rank(),
                            ps.get_pipeline_model_parallel_rank(),
                            meta.pipeline_model_parallel_size, mmap=True)
    for chunk, model in enumerate(chunks):
        saved = state.get(meta.layout.model_key(chunk), {})
        wanted = {n for n, _ in model.named_parameters() if is_adapter_name(n)}
        missing, unexpected = sorted(wanted - set(saved)), sorted(set(saved) - wanted)
        if missing or unexpected:
            raise CheckpointError(f"{iter_dir}: adapters do not fit this model: missing "
                                  f"{missing[:6]}, unexpected {unexpected[:6]}")
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n in wanted:
                params[n].copy_(saved[n])


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
        if not run.settings.same_shape(settings):
            raise CheckpointError(
                f"{load} holds LoRA adapters with rank {run.settings.rank}, alpha "
                f"{run.settings.alpha}, targets {','.join(run.settings.targets)}, but this run "
                f"asks for rank {settings.rank}, alpha {settings.alpha}, targets "
                f"{','.join(settings.targets)}; pass the run's --lora-* values")
        base_dir = check_base(run, read_metadata(load_iter), Path(load))
        info = LoRACheckpointInfo(settings, run.base_checkpoint, run.base_iteration,
                                  run.base_fingerprint)
    chunks, meta, _ = build_model_from_checkpoint(base_dir.parent,
                                                  int(base_dir.name.split("_")[1]), impl=impl,
                                                  **build_kwargs)
    attach_lora(chunks, settings)
    init_adapters(chunks, settings, seed)
    if run is not None:
        _load_adapters(chunks, load_iter, meta)
    return chunks, meta, info, run is not None


def adapter_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Only the adapter tensors of a chunk's state dict (what a LoRA run's checkpoint holds)."""
    return {k: v for k, v in state.items() if is_adapter_name(k)}


def trainable_summary(chunks: list) -> str:
    train = sum(p.numel() for p in adapter_parameters(chunks))
    total = sum(p.numel() for c in chunks for p in c.parameters())
    return f"LoRA: {train:,} trainable of {total:,} parameters on this rank ({train / total:.2%})"
