"""Re-split a Megatron checkpoint for another TP x PP (x VPP) (x EP) layout, e.g. to resume
elsewhere.

Goes through the HF tensor form (the layout-free representation every table already maps):
source stage -> HF tensors -> target stage. Model weights, the iteration number and, for a
training run's checkpoint, its LR schedule and data position move: training from the result
continues at that iteration. Optimizer state (and the RNG of tensor-parallel ranks) is
layout-specific and is not carried: it starts fresh.

This module reshards whatever a :class:`CheckpointReader` yields as the model (a LoRA run's
reader yields the merged model). Keeping a LoRA run adapters-only is
``megatron.sft.lora.reshard``, whose ``reshard_any`` is the entry point that accepts any checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from megatron.sft.bridge.checkpoint_io import (
    CheckpointMetadata,
    check_output_dir,
    partial_iteration_dir,
    publish_iteration,
    write_metadata,
    write_staged,
)
from megatron.sft.bridge.convert import write_stage
from megatron.sft.bridge.integrity import write_checksums
from megatron.sft.bridge.reader import CheckpointReader
from megatron.sft.bridge.rules import ShardContext
from megatron.sft.bridge.transforms import padded_vocab_size
from megatron.sft.runtime.layout import ParallelLayout
from megatron.sft.runtime.locks import exclusive_output
from megatron.sft.runtime.path_overlap import check_output_separate


def reshard_checkpoint(source: "str | Path | CheckpointReader", out_dir: "str | Path",
                       target: ParallelLayout, iteration: Optional[int] = None,
                       force: bool = False, progress: bool = True,
                       verify: bool = True) -> CheckpointMetadata:
    """Write the model ``source`` holds at layout ``target`` into ``out_dir``; returns the
    output's metadata."""
    reader = (source if isinstance(source, CheckpointReader)
              else CheckpointReader(source, iteration, verify))
    target.validate(reader.shape)
    target.check_files()
    check_output_separate(out_dir, "--save-dir", reader.input_dirs())
    out_dir = Path(out_dir)
    with exclusive_output(out_dir, "reshard"):
        check_output_dir(out_dir, force)
        return write_staged(out_dir, lambda root: write_resharded(reader, root, target,
                                                                  progress))


def write_resharded(reader: CheckpointReader, root: Path, target: ParallelLayout,
                    progress: bool) -> CheckpointMetadata:
    """``reader``'s model as a complete checkpoint at ``target`` in ``root``: its iteration
    directory, then the tracker file."""
    shape, spec, src = reader.shape, reader.spec, reader.meta
    reader.check_coverage()
    carried = reader.training_state()  # a run resumes from the result at its iteration
    it = reader.iteration
    ctx = ShardContext(shape, target.tp, padded_vocab_size(
        shape.vocab_size, src.make_vocab_size_divisible_by, target.tp))
    meta = CheckpointMetadata(
        architecture=src.architecture, hf_config=src.hf_config, layout=target,
        make_vocab_size_divisible_by=src.make_vocab_size_divisible_by,
        padded_vocab_size=ctx.padded_vocab_size, params_dtype=src.params_dtype,
        producer="reshard",
    )
    # All source tensors in HF form, keyed by name. The source is mmap'd, so this holds views
    # of the page cache plus the merged copies; reshard is not on the memory-bounded path.
    hf: dict[str, torch.Tensor] = dict(reader.tensors())
    partial = partial_iteration_dir(root, it)
    partial.mkdir(parents=True)
    digests = []
    for pp_rank in tqdm(range(target.pp), desc="reshard stages", disable=not progress):
        digests += write_stage(partial, pp_rank, it, meta, hf.__getitem__, spec, shape, ctx,
                               extra=carried)
    write_metadata(partial, meta)
    write_checksums(partial, digests)
    publish_iteration(root, it)
    return meta
