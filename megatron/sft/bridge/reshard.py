"""Re-split a Megatron checkpoint for another TP x PP (x VPP) layout, e.g. to resume elsewhere.

Goes through the HF tensor form (the layout-free representation every table already maps):
source stage -> HF tensors -> target stage. Model weights and the iteration number move;
optimizer state is layout-specific and is not carried (resume from the result with a fresh
optimizer, e.g. ``--finetune``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

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
from megatron.sft.bridge.rules import ShardContext
from megatron.sft.bridge.stage_mapping import build_stage
from megatron.sft.bridge.transforms import padded_vocab_size
from megatron.sft.runtime.locks import exclusive_output
from megatron.sft.runtime.path_overlap import check_output_separate


def reshard_checkpoint(ckpt_dir: "str | Path", out_dir: "str | Path", target: ParallelLayout,
                       iteration: Optional[int] = None, force: bool = False,
                       progress: bool = True) -> CheckpointMetadata:
    reader = CheckpointReader(ckpt_dir, iteration)
    shape, spec, src = reader.shape, reader.spec, reader.meta
    target.validate(shape)
    check_output_separate(out_dir, "--save-dir", {"--load-dir": ckpt_dir})
    with exclusive_output(out_dir, "reshard"):
        check_output_dir(Path(out_dir), force)
        return _reshard_locked(reader, Path(out_dir), target, progress)


def _reshard_locked(reader: CheckpointReader, out_dir: Path, target: ParallelLayout,
                    progress: bool) -> CheckpointMetadata:
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
    staging = staging_dir(Path(out_dir))
    if staging.exists():
        shutil.rmtree(staging)
    try:
        partial = partial_iteration_dir(staging, it)
        partial.mkdir(parents=True)
        for pp_rank in tqdm(range(target.pp), desc="reshard stages", disable=not progress):
            save_stage(partial, pp_rank, target.pp, it, meta,
                       build_stage(hf.__getitem__, spec, shape, target, pp_rank, ctx))
        write_metadata(partial, meta)
        publish_iteration(staging, it)
        publish_directory(staging, Path(out_dir))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta
