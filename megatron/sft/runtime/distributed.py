"""The one place that starts ``torch.distributed`` and megatron-core's parallel state.

Reads the usual ``torchrun`` environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); a plain ``python`` launch becomes a world of one. NCCL on GPU, gloo (with
:mod:`cpu_mode`) without one.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import warnings
from typing import Optional

import torch

from megatron.sft.runtime.cpu_mode import enable_cpu_mode
from megatron.sft.runtime.layout import ParallelLayout
from megatron.sft.runtime.mcore_compat import apply_megatron_core_fixes
from megatron.sft.runtime.parallel_dims import (
    ParallelDims,
    parallel_dims_or_none,
    set_parallel_dims,
)
from megatron.sft.runtime.ports import free_port


@dataclasses.dataclass(frozen=True)
class RuntimeInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    cpu_mode: bool
    #: this rank's place in the layout (also :func:`parallel_dims` from anywhere)
    dims: ParallelDims

    @property
    def data_parallel_size(self) -> int:
        return self.dims.dp_size


def quiet_megatron_import_warnings() -> None:
    """megatron-core warns at import time about missing TE/Apex; on CPU that is expected."""
    for pattern in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                    ".*transformer_engine.*", ".*Torch Norm.*", ".*full scope is deprecated.*",
                    ".*CUDA_DEVICE_MAX_CONNECTIONS.*", ".*reduce_scatter_tensor. is deprecated.*",
                    ".*_all_gather_base.*is.*deprecated.*",
                    # megatron-core reads .grad of the main-param views it builds on purpose
                    ".*The .grad attribute of a Tensor that is not a leaf Tensor.*"):
        warnings.filterwarnings("ignore", message=pattern)


def _single_process_env() -> None:
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def initialize_distributed(layout: ParallelLayout, *, seed: int = 1234,
                           backend: Optional[str] = None, timeout_minutes: float = 30
                           ) -> RuntimeInfo:
    """Start the process group and megatron-core's parallel state for ``layout``.

    ``backend`` ``None`` picks nccl when CUDA is available, gloo otherwise. ``timeout_minutes``:
    how long a collective waits for its peers, in every group (the trainer derives it from
    ``--hang-timeout-minutes``). Idempotent per process: a second call with the same layout
    returns the same info.
    """
    quiet_megatron_import_warnings()
    _single_process_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    layout.validate(world_size=world)
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    cpu = not use_cuda and enable_cpu_mode()
    apply_megatron_core_fixes()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"), rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        current = getattr(parallel_dims_or_none(), "layout", None)
        # the process groups (FSDP or not runs in the same ones: tests run both in one process)
        if current is not None and current.to_megatron() != layout.to_megatron():
            raise RuntimeError(f"model parallel state already initialised as "
                               f"{current.describe()}, not {layout.describe()}")
    else:
        ps.initialize_model_parallel(**layout.to_megatron(),
                                     distributed_timeout_minutes=timeout_minutes)
        model_parallel_cuda_manual_seed(seed)
    dims = ParallelDims.from_parallel_state(layout)
    set_parallel_dims(dims)
    return RuntimeInfo(
        rank=rank, world_size=world, local_rank=local_rank,
        device=torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"),
        cpu_mode=cpu, dims=dims,
    )


def destroy_distributed(wait_for_peers: bool = False) -> None:
    """Tear the process groups down before the interpreter does.

    Left to interpreter shutdown, gloo's worker threads can be destroyed while still joinable and
    the rank dies with SIGABRT ("terminate called without an active exception") after its work
    is done. ``wait_for_peers`` adds a barrier first so no rank tears down its connections while
    another is still using them; use it only on the success path (a barrier after one rank
    failed would wait for the full timeout).
    """
    import torch.distributed as dist

    if wait_for_peers and dist.is_initialized():
        dist.barrier()

    release_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def release_model_parallel() -> None:
    """Forget megatron-core's parallel state *and* close its process groups, so the next
    ``initialize_distributed`` (another layout in the same process) starts clean.

    ``parallel_state.destroy_model_parallel`` only drops its references: every gloo group keeps
    its worker threads, which poll. A process that switches layouts many times (the test
    workers run tens of trainers in one launch) otherwise accumulates hundreds of them and
    the machine's load with them."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and dist.is_initialized():
        world = dist.group.WORLD
        seen: list = []
        for value in list(vars(ps).values()):
            for group in (value if isinstance(value, (list, tuple)) else (value,)):
                if isinstance(group, dist.ProcessGroup) and group is not world \
                        and not any(group is g for g in seen):
                    seen.append(group)
        for group in seen:
            try:
                dist.destroy_process_group(group)
            except (ValueError, RuntimeError):  # not a group this process registered
                pass
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    # what destroy_model_parallel leaves behind keeps the groups' C++ objects (and threads)
    # alive: 0.16.1 does not reset the *_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP* globals,
    # and the MoE logging tracker holds each metric's reduce group
    for name, value in list(vars(ps).items()):
        if isinstance(value, dist.ProcessGroup) and value is not dist.group.WORLD:
            setattr(ps, name, None)
    try:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    except ImportError:  # pragma: no cover - older megatron-core
        pass
    else:
        get_moe_layer_wise_logging_tracker().clear()
    set_parallel_dims(None)
