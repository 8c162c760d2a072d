"""This rank's place in the :class:`ParallelLayout`, built once after megatron-core's
``initialize_model_parallel``: the questions code asks about parallelism, answered in one place.

Instead of calling ``parallel_state`` where a rule is needed ("only data-parallel rank 0
writes the checkpoint", "the loss is summed over DP and PP") code asks :func:`parallel_dims`:

- ``writes_rank_file``: one rank per checkpoint file (DP x CP rank 0 of its model-parallel
  coordinates), so a new dimension that replicates weights cannot add writers;
- ``is_logger``: the one voice (the last rank holds the last pipeline stage);
- ``loss_groups``: the groups a loss sum crosses to become the global batch's;
- ``microbatch_rows``: how a global batch is cut for this rank; ``cp_size`` / ``cp_rank``: how
  each of its rows is cut again over context-parallel ranks (the split itself is the pure
  :mod:`megatron.sft.model.context_parallel.split`, applied through ``AttentionInputs.local_index``);
- ``tp_group``, ``cp_group``: the process groups the loss and attention collectives use;
- ``tp_rank``, ``pp_rank``, ``ep_rank``, stage predicates: which weights this rank holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from megatron.sft.runtime.layout import ParallelLayout, microbatch_rows, rows_from


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    layout: ParallelLayout
    world_size: int
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    #: data-parallel ranks of the dense weights (world / (TP x PP x CP))
    dp_size: int
    cp_rank: int = 0
    ep_rank: int = 0
    #: rank among the ranks holding the same experts (world / (ETP x EP x PP) of them)
    expert_dp_rank: int = 0

    @classmethod
    def from_parallel_state(cls, layout: ParallelLayout) -> "ParallelDims":
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        return cls(layout=layout, world_size=dist.get_world_size(), rank=dist.get_rank(),
                   tp_rank=ps.get_tensor_model_parallel_rank(),
                   pp_rank=ps.get_pipeline_model_parallel_rank(),
                   dp_rank=ps.get_data_parallel_rank(),
                   dp_size=ps.get_data_parallel_world_size(),
                   cp_rank=ps.get_context_parallel_rank(),
                   ep_rank=ps.get_expert_model_parallel_rank(),
                   expert_dp_rank=ps.get_expert_data_parallel_rank())

    # ------------------------------------------------------------------ roles
    @property
    def writes_rank_file(self) -> bool:
        """Exactly one rank writes each (tp, pp[, ep]) file: weights are replicated over DP and
        CP, so their rank 0 does; with expert parallelism a file holds one EP rank's experts
        too, which are replicated over the expert-data-parallel ranks (DP x CP / EP), so their
        rank 0 does (with expert TP = TP there is one such rank per (tp, pp, ep); with expert
        TP 1 one per (pp, ep), which is TP rank ``ep mod TP``: ``ParallelLayout.file_ranks``)."""
        if self.layout.ep > 1:
            return self.expert_dp_rank == 0
        return self.dp_rank == 0 and self.cp_rank == 0

    @property
    def is_logger(self) -> bool:
        return self.rank == self.world_size - 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def stage_flags(self, chunk: int) -> tuple[bool, bool]:
        """``(pre_process, post_process)`` of model chunk ``chunk`` on this rank: whether it
        holds the embedding and the output layer."""
        return self.layout.has_embedding(self.pp_rank, chunk), \
            self.layout.has_output(self.pp_rank, chunk)

    @property
    def cp_size(self) -> int:
        return self.layout.cp

    # ------------------------------------------------------------------ collectives
    def tp_group(self) -> Any:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_group()

    def cp_group(self) -> Any:
        from megatron.core import parallel_state as ps

        return ps.get_context_parallel_group()

    def loss_groups(self) -> list[Any]:
        """Process groups a micro-batch loss sum is all-reduced over to become the global
        batch's, on every rank: the data-parallel ranks (with their context-parallel ranks,
        which each hold part of every sequence) and the pipeline (only the last stage has it)."""
        from megatron.core import parallel_state as ps

        return [ps.get_data_parallel_group(with_context_parallel=True),
                ps.get_pipeline_model_parallel_group()]

    def routing_groups(self, sequence_parallel: bool) -> dict[str, Any]:
        """Groups that per-layer MoE routing metrics are reduced over: ``pp`` (each layer lives
        on one stage), ``split`` (the ranks that split one micro-batch's tokens: CP, and TP
        under sequence parallelism), ``tp_cp`` (megatron-core's router reduce group) and
        ``dp`` (data-parallel replicas, without CP, which is in ``split``)."""
        from megatron.core import parallel_state as ps

        tp_cp = ps.get_tensor_and_context_parallel_group()
        return {"pp": ps.get_pipeline_model_parallel_group(), "tp_cp": tp_cp,
                "split": tp_cp if sequence_parallel else ps.get_context_parallel_group(),
                "dp": ps.get_data_parallel_group()}

    # ------------------------------------------------------------------ data
    def microbatch_rows(self, iteration: int, global_batch: int, micro_batch: int
                        ) -> list[list[int]]:
        """Dataset rows of each micro-batch this rank runs at ``iteration`` (see
        ``runtime.layout.microbatch_rows``)."""
        return microbatch_rows(iteration, global_batch, micro_batch, self.dp_rank, self.dp_size)

    def rows_from(self, first_row: int, global_batch: int, micro_batch: int) -> list[list[int]]:
        """This rank's micro-batches of the global batch starting at dataset row ``first_row``."""
        return rows_from(first_row, global_batch, micro_batch, self.dp_rank, self.dp_size)

    def describe(self) -> str:
        cp = f", cp {self.cp_rank}" if self.layout.cp > 1 else ""
        return (f"rank {self.rank}/{self.world_size}: {self.layout.describe()} DP{self.dp_size}"
                f" (tp {self.tp_rank}, pp {self.pp_rank}, dp {self.dp_rank}{cp})")


_DIMS: Optional[ParallelDims] = None


def set_parallel_dims(dims: Optional[ParallelDims]) -> None:
    global _DIMS
    _DIMS = dims


def parallel_dims_or_none() -> Optional[ParallelDims]:
    return _DIMS


def parallel_dims() -> ParallelDims:
    """This process's :class:`ParallelDims`, set by ``runtime.distributed.initialize_distributed``."""
    if _DIMS is None:
        raise RuntimeError("parallel layout not initialised: call "
                           "megatron.sft.runtime.distributed.initialize_distributed first")
    return _DIMS
