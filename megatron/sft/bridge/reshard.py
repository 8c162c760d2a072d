"""Re-split a Megatron checkpoint for another TP x PP (x VPP) layout, e.g. to resume elsewhere.

Goes through the HF tensor form (the layout-free representation every table already maps):
source stage -> HF tensors -> target stage. Model weights and the iteration number move;
optimizer state is layout-specific and is not carried (resume from the result with a fresh
optimizer, e.g. ``--finetune``).

A LoRA run stays a LoRA run (``lora_reshard.py``): its adapters are re-split through the PEFT
form and its ``lora.json`` points to a base at the target layout, either the run's base
resharded into ``OUT/base`` or ``lora_base``. ``merge_lora`` instead writes the full model with
the adapters merged (what ``merge_and_export.sh`` exports).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch
from tqdm import tqdm

from megatron.sft.bridge.checkpoint_io import (
    CheckpointMetadata,
    check_output_dir,
    partial_iteration_dir,
    publish_directory,
    publish_iteration,
    staging_dir,
    write_metadata,
)
from megatron.sft.bridge.convert import save_stage
from megatron.sft.bridge.export import CheckpointReader
from megatron.sft.bridge.layout import ParallelLayout
from megatron.sft.bridge.lora_export import LORA_FILE, check_base
from megatron.sft.bridge.lora_reshard import check_lora_base, write_adapter_run
from megatron.sft.bridge.rules import ShardContext
from megatron.sft.bridge.stage_mapping import build_stage
from megatron.sft.bridge.transforms import padded_vocab_size
from megatron.sft.runtime.locks import exclusive_output
from megatron.sft.runtime.path_overlap import check_output_separate

#: where a LoRA run's resharded base goes inside the output (default mode)
LORA_BASE_SUBDIR = "base"

R = TypeVar("R")


def reshard_checkpoint(ckpt_dir: "str | Path", out_dir: "str | Path", target: ParallelLayout,
                       iteration: Optional[int] = None, force: bool = False,
                       progress: bool = True, lora_base: "str | Path | None" = None,
                       merge_lora: bool = False) -> CheckpointMetadata:
    """Write ``ckpt_dir`` at layout ``target`` into ``out_dir``; returns the output's metadata.

    For a LoRA run: an adapter-only run at ``target`` whose base is ``out_dir/base`` (the run's
    base, resharded) or ``lora_base`` (an existing checkpoint of the same model at ``target``);
    with ``merge_lora`` a full checkpoint with the adapters merged.
    """
    reader = CheckpointReader(ckpt_dir, iteration)
    target.validate(reader.shape)
    lora = reader.lora
    if lora is None and (lora_base is not None or merge_lora):
        flag = "--lora-base" if lora_base is not None else "--merge-lora"
        raise ValueError(f"{flag} applies to a LoRA run, but {reader.iter_dir} is a full "
                         f"checkpoint (no {LORA_FILE}); drop {flag}")
    if lora_base is not None and merge_lora:
        raise ValueError("Can't provide both --lora-base and --merge-lora: --merge-lora writes a "
                         "full checkpoint, which needs no base. Choose one.")
    inputs = {"--load-dir": ckpt_dir, "--lora-base": lora_base,
              f"base_checkpoint of {LORA_FILE}": lora.base_checkpoint if lora else None}
    check_output_separate(out_dir, "--save-dir", inputs)
    out_dir = Path(out_dir)
    with exclusive_output(out_dir, "reshard"):
        check_output_dir(out_dir, force)
        if lora is None or merge_lora:
            return _publish_staged(out_dir, lambda root: _write_resharded(reader, root, target,
                                                                          progress))
        return _reshard_lora_locked(reader, out_dir, target, lora_base, progress)


def _reshard_lora_locked(run: CheckpointReader, out_dir: Path, target: ParallelLayout,
                         lora_base: "str | Path | None", progress: bool) -> CheckpointMetadata:
    # Everything that can refuse does so before staging exists.
    base_dir = check_base(run.lora, run.meta, run.iter_dir.parent)
    run_base = CheckpointReader(base_dir.parent, run.lora.base_iteration)
    if lora_base is not None:
        candidate = CheckpointReader(lora_base)
        check_lora_base(candidate, run_base, target)
        return _publish_staged(out_dir, lambda root: write_adapter_run(
            run, root, candidate.iter_dir, candidate.iter_dir.parent.resolve()))

    def write(root: Path) -> CheckpointMetadata:
        # The base is staged inside the run's staging directory, and lora.json names where
        # it will be once the whole directory is renamed to out_dir.
        _write_resharded(run_base, root / LORA_BASE_SUBDIR, target, progress)
        return write_adapter_run(run, root, root / LORA_BASE_SUBDIR / run_base.iter_dir.name,
                                 out_dir.resolve() / LORA_BASE_SUBDIR)

    return _publish_staged(out_dir, write)


def _publish_staged(out_dir: Path, write: Callable[[Path], R]) -> R:
    """Run ``write(staging)`` and rename the staging directory to ``out_dir``; on any error
    (or interrupt) remove it, so nothing half-written is ever at ``out_dir``."""
    staging = staging_dir(out_dir)
    if staging.exists():
        shutil.rmtree(staging)
    try:
        result = write(staging)
        publish_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _write_resharded(reader: CheckpointReader, root: Path, target: ParallelLayout,
                     progress: bool) -> CheckpointMetadata:
    """``reader``'s model (merged, for a LoRA run) as a complete checkpoint at ``target`` in
    ``root``: its iteration directory, then the tracker file."""
    shape, spec, src = reader.shape, reader.spec, reader.meta
    reader.check_coverage()
    it = int(reader.iter_dir.name.split("_")[1])
    ctx = ShardContext(shape, target.tp, padded_vocab_size(
        shape.vocab_size, src.make_vocab_size_divisible_by, target.tp))
    meta = CheckpointMetadata(
        architecture=src.architecture, hf_config=src.hf_config,
        tensor_model_parallel_size=target.tp, pipeline_model_parallel_size=target.pp,
        virtual_pipeline_model_parallel_size=target.vpp,
        make_vocab_size_divisible_by=src.make_vocab_size_divisible_by,
        padded_vocab_size=ctx.padded_vocab_size, params_dtype=src.params_dtype,
    )
    # All source tensors in HF form, keyed by name. The source is mmap'd, so this holds views
    # of the page cache plus the merged copies; reshard is not on the memory-bounded path.
    hf: dict[str, torch.Tensor] = dict(reader.tensors())
    partial = partial_iteration_dir(root, it)
    partial.mkdir(parents=True)
    for pp_rank in tqdm(range(target.pp), desc="reshard stages", disable=not progress):
        save_stage(partial, pp_rank, target.pp, it, meta,
                   build_stage(hf.__getitem__, spec, shape, target, pp_rank, ctx))
    write_metadata(partial, meta)
    publish_iteration(root, it)
    return meta
