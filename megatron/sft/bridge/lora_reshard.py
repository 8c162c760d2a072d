"""Reshard a LoRA run and keep it a LoRA run: adapters re-split for another TP x PP (x VPP),
pointing at a base checkpoint at that layout.

A LoRA run's adapters fit exactly one base (its ``lora.json``), and a run and its base must
share a layout (``check_base``), so both move. The adapters go through the layout-free PEFT
form, the way weights go through HF tensors: shards -> ``{hf_module: (lora_A, lora_B)}`` ->
shards at the target TP (``lora_split``). The base at the target layout is either

- the run's base resharded into ``OUT/base`` (the default; ``OUT`` is then self-contained), or
- a checkpoint the user already has at that layout (``--lora-base``, e.g. the HF model
  converted at TP4), accepted only when it holds the same model, tensor for tensor::

    OUT/
      latest_checkpointed_iteration.txt
      iter_0000040/  lora.json  sft_metadata.json  mp_rank_TT[_PPP]/model_optim_rng.pt (adapters)
      base/          (default only) the base at the target layout, at its own iteration

No optimizer state is written (it is layout-specific): ``--load OUT --lora-rank R ...`` loads
the adapters and starts a fresh optimizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megatron.sft.bridge.checkpoint_io import (
    CheckpointError,
    CheckpointMetadata,
    partial_iteration_dir,
    publish_iteration,
    read_metadata,
    write_metadata,
)
from megatron.sft.bridge.convert import save_stage
from megatron.sft.bridge.export import CheckpointReader
from megatron.sft.bridge.layout import ParallelLayout
from megatron.sft.bridge.lora_export import (
    LoRACheckpointInfo,
    base_fingerprint,
    read_run_adapters,
    write_lora_info,
)
from megatron.sft.bridge.lora_split import adapter_from_hf, adapter_prefix
from megatron.sft.bridge.model_shape import ModelShape

#: ``{(global layer, target): {hf_module: (lora_A, lora_B)}}``, see ``read_run_adapters``
PeftAdapters = dict[tuple[int, str], dict[str, tuple[torch.Tensor, torch.Tensor]]]


def adapter_stage(adapters: PeftAdapters, targets: tuple[str, ...], shape: ModelShape,
                  layout: ParallelLayout, pp_rank: int) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Per TP rank: ``{"model" | "model0".. : {adapter name: tensor}}`` for pipeline stage
    ``pp_rank`` (stage-local layer numbers, as a LoRA run saves them)."""
    ranks: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in range(layout.tp)]
    for chunk in range(layout.chunks):
        key = layout.model_key(chunk)
        for sd in ranks:
            sd[key] = {}
        for local, layer in enumerate(layout.chunk_layers(shape, pp_rank, chunk)):
            for target in targets:
                a_shards, b_shards = adapter_from_hf(target, adapters[(layer, target)], shape,
                                                     layout.tp)
                prefix = adapter_prefix(local, target)
                for sd, a, b in zip(ranks, a_shards, b_shards):
                    sd[key][prefix + "A"], sd[key][prefix + "B"] = a, b
    return ranks


def run_metadata(run: CheckpointMetadata, base: CheckpointMetadata) -> CheckpointMetadata:
    """The resharded run's metadata: the run's model and dtype, the base's layout and vocab
    padding (``check_base`` compares exactly these with the base when the run is loaded)."""
    return dataclasses.replace(
        run, tensor_model_parallel_size=base.tensor_model_parallel_size,
        pipeline_model_parallel_size=base.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=base.virtual_pipeline_model_parallel_size,
        make_vocab_size_divisible_by=base.make_vocab_size_divisible_by,
        padded_vocab_size=base.padded_vocab_size)


def write_adapter_run(run: CheckpointReader, root: Path, base_iter_dir: Path,
                      base_path: Path) -> CheckpointMetadata:
    """Write ``run``'s adapters into ``root`` (a staging directory) at the layout of the base
    in ``base_iter_dir``, with a ``lora.json`` naming ``base_path`` (where that base will be
    once published) at its iteration and fingerprint."""
    info = run.lora
    meta = run_metadata(run.meta, read_metadata(base_iter_dir))
    layout = meta.layout
    adapters = read_run_adapters(run.iter_dir, info, run.meta, run.shape)
    it = int(run.iter_dir.name.split("_")[1])
    partial = partial_iteration_dir(root, it)
    partial.mkdir(parents=True)
    for pp_rank in range(layout.pp):
        save_stage(partial, pp_rank, layout.pp, it, meta,
                   adapter_stage(adapters, info.settings.targets, run.shape, layout, pp_rank))
    write_metadata(partial, meta)
    write_lora_info(partial, LoRACheckpointInfo(
        info.settings, str(base_path), int(base_iter_dir.name.split("_")[1]),
        base_fingerprint(base_iter_dir)))
    publish_iteration(root, it)
    return meta


def check_lora_base(candidate: CheckpointReader, run_base: CheckpointReader,
                    target: ParallelLayout) -> None:
    """``--lora-base``: refuse a checkpoint that is not at ``target`` or not the very model the
    adapters were trained on (compared in HF form, so across layouts: every tensor equal in
    name, dtype, shape and value); the error names the first difference."""
    where = f"--lora-base {candidate.iter_dir.parent}"
    fix = ("leave --lora-base out to reshard the run's own base into OUT/base, or pass a "
           f"checkpoint of that same model at {target.describe()}")
    if candidate.lora is not None:
        raise CheckpointError(f"{where} is itself a LoRA run (adapters only); {fix}")
    if candidate.layout != target:
        raise CheckpointError(f"{where} is at {candidate.layout.describe()}, but the target layout "
                              f"is {target.describe()}; {fix}")
    mine, theirs = candidate.meta, run_base.meta
    diffs = ([f"architecture {mine.architecture} vs {theirs.architecture}"]
             if mine.architecture != theirs.architecture else [])
    diffs += [f"config.json {k}: {mine.hf_config.get(k)!r} vs {theirs.hf_config.get(k)!r}"
              for k in sorted(set(mine.hf_config) | set(theirs.hf_config))
              if mine.hf_config.get(k) != theirs.hf_config.get(k)]
    if diffs:
        raise CheckpointError(f"{where} is a different model than the run's base "
                              f"{run_base.iter_dir} ({'; '.join(diffs[:4])}); {fix}")
    reference = dict(run_base.tensors())  # mmap'd views, as reshard holds them
    for name, t in candidate.tensors():
        ref = reference.pop(name, None)
        if ref is None:
            problem = "is not in the run's base"
        elif (ref.dtype, ref.shape) != (t.dtype, t.shape):
            problem = (f"is {str(t.dtype)[6:]} {tuple(t.shape)}, the run's base's is "
                       f"{str(ref.dtype)[6:]} {tuple(ref.shape)}")
        elif not torch.equal(ref, t):
            diff = (t.double() - ref.double()).abs().max().item()
            problem = f"differs from the run's base's (max abs difference {diff:.3g})"
        else:
            continue
        raise CheckpointError(f"{where} is not the base the adapters were trained on: its {name} "
                              f"{problem} ({run_base.iter_dir}); adapters only fit the exact "
                              f"base they were trained on. {fix[0].upper() + fix[1:]}")
    if reference:
        raise CheckpointError(f"{where} lacks tensors of the run's base: "
                              f"{sorted(reference)[:6]}; {fix}")
