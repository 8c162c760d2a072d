"""The one place that starts ``torch.distributed`` and megatron-core's parallel state.

Reads the usual ``torchrun`` environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); a plain ``python`` launch becomes a world of one. NCCL on GPU, gloo (with
:mod:`cpu_mode`) without one.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import warnings
from typing import Optional

import torch

from megatron.sft.runtime.cpu_mode import enable_cpu_mode


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    seed: int = 1234
    #: ``None`` picks nccl when CUDA is available, gloo otherwise
    backend: Optional[str] = None
    timeout_minutes: int = 30


@dataclasses.dataclass(frozen=True)
class RuntimeInfo:
    rank: int
    world_size: int
    local_rank: int
    data_parallel_size: int
    device: torch.device
    cpu_mode: bool


def quiet_megatron_import_warnings() -> None:
    """megatron-core warns at import time about missing TE/Apex; on CPU that is expected."""
    for pattern in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                    ".*transformer_engine.*", ".*Torch Norm.*", ".*full scope is deprecated.*",
                    ".*CUDA_DEVICE_MAX_CONNECTIONS.*", ".*reduce_scatter_tensor. is deprecated.*",
                    ".*_all_gather_base.*is.*deprecated.*",
                    # megatron-core reads .grad of the main-param views it builds on purpose
                    ".*The .grad attribute of a Tensor that is not a leaf Tensor.*"):
        warnings.filterwarnings("ignore", message=pattern)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def initialize_distributed(cfg: ParallelConfig) -> RuntimeInfo:
    """Idempotent per process: a second call with the same sizes returns the same info."""
    quiet_megatron_import_warnings()
    _single_process_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    model_parallel = cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by TP x PP = {cfg.tensor_model_parallel_size} x "
            f"{cfg.pipeline_model_parallel_size}; launch a multiple of {model_parallel} processes"
        )
    use_cuda = torch.cuda.is_available() and cfg.backend != "gloo"
    cpu = not use_cuda and enable_cpu_mode()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    backend = cfg.backend or ("nccl" if use_cuda else "gloo")
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        same = (ps.get_tensor_model_parallel_world_size() == cfg.tensor_model_parallel_size and
                ps.get_pipeline_model_parallel_world_size() == cfg.pipeline_model_parallel_size)
        if not same:
            raise RuntimeError("model parallel state already initialised with other sizes")
    else:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        )
        model_parallel_cuda_manual_seed(cfg.seed)
    return RuntimeInfo(
        rank=rank, world_size=world, local_rank=local_rank,
        data_parallel_size=world // model_parallel,
        device=torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"),
        cpu_mode=cpu,
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
    from megatron.core import parallel_state as ps

    if wait_for_peers and dist.is_initialized():
        dist.barrier()

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
