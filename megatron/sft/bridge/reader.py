"""Read a Megatron checkpoint (any TP x PP x VPP x EP) as HF tensors, one pipeline stage (and
expert-parallel rank) at a time.

The reader is the one way export and reshard see a checkpoint. It reads the rank files as
they are; a checkpoint kind whose files are not the whole model (a LoRA run holds adapters
only) subclasses it and overrides :meth:`CheckpointReader.stage_states` (see
``megatron.sft.lora.merge``), so this tier knows nothing of such kinds.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron.sft.bridge.architectures import shape_of
from megatron.sft.bridge.checkpoint_io import (
    CheckpointMetadata,
    iteration_dir,
    load_rank_state,
    read_metadata,
)
from megatron.sft.bridge.integrity import unverified_notice
from megatron.sft.bridge.rules import ShardContext
from megatron.sft.bridge.stage_mapping import export_plan, required_hf_names, stage_to_hf


class CoverageError(ValueError):
    """Source tensors and the architecture table disagree."""


class CheckpointReader:
    """Yields the HF tensors of a Megatron checkpoint, one pipeline stage mapped at a time."""

    def __init__(self, ckpt_dir: "str | Path", iteration: Optional[int] = None,
                 verify: bool = True):
        #: check every rank file against the iteration's checksums before reading it
        self.verify = verify
        self.iter_dir = iteration_dir(Path(ckpt_dir), iteration)
        self.meta: CheckpointMetadata = read_metadata(self.iter_dir)
        self.spec, self.shape = shape_of(self.meta.hf_config)
        self.layout = self.meta.layout
        self.ctx = ShardContext(self.shape, self.layout.tp, self.meta.padded_vocab_size,
                                expert_tp_size=self.layout.expert_tp)
        notice = unverified_notice(self.iter_dir) if verify else None
        if notice is not None:  # exports and reshards say so, as training does
            print(f"warning: {notice}", file=sys.stderr, flush=True)

    @property
    def iteration(self) -> int:
        return int(self.iter_dir.name.split("_")[1])

    def input_dirs(self) -> dict[str, Path]:
        """Directories this reader reads, by the flag or file that names them (an output
        must lie outside all of them)."""
        return {"--load-dir": self.iter_dir.parent}

    def rank_states(self, pp_rank: int, ep_rank: int = 0) -> list[dict]:
        """One pipeline stage's rank files (of expert-parallel rank ``ep_rank``) as they are
        on disk (``mmap``: nothing is read until a tensor is used), by TP rank; each checked
        against the iteration's checksums first (unless ``verify`` is off). With whole experts
        an EP rank has one file; the other TP ranks' dense shards come from other EP ranks'
        files (``ParallelLayout.reader_ep_rank``, ``stage_mapping.rule_tp_ranks``)."""
        return [load_rank_state(self.iter_dir, self.layout, tp, pp_rank,
                                self.layout.reader_ep_rank(tp, ep_rank), verify=self.verify)
                for tp in range(self.layout.tp)]

    def training_state(self) -> dict:
        """What a training run's checkpoint carries besides weights and optimizer that does not
        depend on the layout: ``train_state`` (consumed samples, data identity) and the LR
        schedule (``opt_param_scheduler``); empty for a converted checkpoint."""
        state = self.rank_states(0)[0]
        return {k: state[k] for k in ("train_state", "opt_param_scheduler") if k in state}

    def stage_states(self, pp_rank: int, merge: bool = True, ep_rank: int = 0) -> list[dict]:
        """The model's states of one pipeline stage (and EP rank), by TP rank. A checkpoint
        kind whose files are not the model overrides this; ``merge=False`` then asks only for
        states with the model's structure (same names, shapes and dtypes), for checks that read
        no values."""
        return self.rank_states(pp_rank, ep_rank)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every HF tensor once: per stage the dense ones and EP rank 0's experts from EP rank
        0's files, then each further EP rank's experts from its own."""
        for pp_rank in range(self.layout.pp):
            for ep_rank in range(self.layout.ep):
                states = self.stage_states(pp_rank, ep_rank=ep_rank)
                yield from stage_to_hf(states, self.spec, self.shape, self.layout, pp_rank,
                                       self.ctx, ep_rank)
                del states

    def check_coverage(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """The planned output ``(name, dtype, shape)`` list, after checking that every rank file
        holds every tensor the table needs (nothing is read but the pickles' structure)."""
        entries, absent = [], []
        for pp_rank, ep_rank in ((p, e) for p in range(self.layout.pp)
                                 for e in range(self.layout.ep)):
            states = self.stage_states(pp_rank, merge=False, ep_rank=ep_rank)
            for name, key, mname, dims in export_plan(self.spec, self.shape, self.layout,
                                                      pp_rank, ep_rank):
                have = [s.get(key, {}).get(mname) for s in states]
                if any(t is None for t in have):
                    absent.append(f"{mname} (pp={pp_rank}, ep={ep_rank}, {key})")
                    continue
                entries.append((name, have[0].dtype, dims))
        names = [e[0] for e in entries]
        missing = sorted(set(required_hf_names(self.spec, self.shape)) - set(names))
        if absent or missing:
            raise CoverageError(f"checkpoint {self.iter_dir} cannot be exported: rank files lack "
                                f"{sorted(set(absent))[:8]}; HF tensors not produced {missing[:8]}")
        return entries


