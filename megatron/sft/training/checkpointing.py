"""Save and resume training checkpoints in the Megatron-LM layout the export script reads.

Each rank writes ``iter_N.partial/mp_rank_TT[_PPP]/model_optim_rng.pt`` (model chunks in the
checkpoint naming, optimizer, LR schedule, RNG, iteration); with the distributed optimizer
each data-parallel group also writes ``distrib_optim.pt`` there. After a barrier, rank 0 renames
the directory into place, then updates ``latest_checkpointed_iteration.txt`` and prunes old
iterations. A crash mid-save leaves only a ``.partial`` directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from megatron.sft.runtime.layer_impl import LayerImpl
from megatron.sft.bridge.checkpoint_io import (
    CHECKPOINT_VERSION,
    CheckpointMetadata,
    dtype_name,
    iteration_dir,
    load_rank_state,
    partial_iteration_dir,
    publish_iteration,
    rank_file,
    read_metadata,
    save_rank_state,
    write_metadata,
)
from megatron.sft.runtime.parallel_dims import parallel_dims

from megatron.sft.lora.run_format import write_lora_info
from megatron.sft.lora.settings import adapter_state_dict

DISTRIB_OPTIM_FILE = "distrib_optim.pt"


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def uses_distributed_optimizer(optimizer) -> bool:
    """Sharded optimizer state lives in ``distrib_optim.pt`` (megatron-core's ChainedOptimizer
    exposes the save/load methods whatever it wraps, so ask the wrapped optimizers)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer)
               for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain types and tensors only, so the file loads with torch.load(weights_only=True).
    state = {"random": random.getstate(),
             "np": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    kind, keys, pos, has_gauss, cached = state["np"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(save_dir: str, iteration: int, model: list, optimizer, scheduler,
                    meta: CheckpointMetadata, impl: LayerImpl, train_state: dict[str, Any],
                    keep_last: int, lora=None) -> Path:
    """``lora`` (a ``LoRACheckpointInfo``): save only the adapters, plus ``lora.json``."""
    import torch.distributed as dist

    dims = parallel_dims()
    save = Path(save_dir)
    partial = partial_iteration_dir(save, iteration)
    rank0 = dist.get_rank() == 0
    if rank0:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    dist.barrier()
    dtype = next(_unwrap(model[0]).parameters()).dtype
    meta_now = dataclasses.replace(meta, params_dtype=dtype_name(dtype))
    rank_path = rank_file(partial, meta.layout, dims.tp_rank, dims.pp_rank, dims.ep_rank)
    rank_path.parent.mkdir(parents=True, exist_ok=True)
    if uses_distributed_optimizer(optimizer):
        # Collective over the data-parallel group; its rank 0 writes the gathered shards.
        optimizer.save_parameter_state(str(rank_path.with_name(DISTRIB_OPTIM_FILE)))
    if dims.writes_rank_file:
        state: dict[str, Any] = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
            "sft_metadata": meta_now.to_dict(),
            "optimizer": optimizer.state_dict(),
            "opt_param_scheduler": scheduler.state_dict(),
            "rng_state": rng_state(),
            "train_state": dict(train_state),
        }
        for chunk, m in enumerate(model):
            sd = impl.model_to_checkpoint(_unwrap(m).state_dict())
            state[meta.layout.model_key(chunk)] = sd if lora is None else adapter_state_dict(sd)
        save_rank_state(partial, meta.layout, dims.tp_rank, dims.pp_rank, state, dims.ep_rank)
    dist.barrier()
    if rank0:
        write_metadata(partial, meta_now)
        if lora is not None:
            write_lora_info(partial, lora)
        final = publish_iteration(save, iteration)
        _prune(save, keep_last)
    dist.barrier()
    return save / final.name if rank0 else iteration_dir(save, iteration)


def _prune(save: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    iters = sorted(p for p in save.glob("iter_*") if p.is_dir() and not p.name.endswith("partial"))
    for old in iters[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def is_training_checkpoint(load_dir: str, iteration: Optional[int] = None) -> bool:
    """Converted checkpoints hold weights only; a run's checkpoints hold optimizer state too."""
    dims = parallel_dims()
    it_dir = iteration_dir(Path(load_dir), iteration)
    state = load_rank_state(it_dir, read_metadata(it_dir).layout, dims.tp_rank, dims.pp_rank,
                            dims.ep_rank)
    return "optimizer" in state


@contextlib.contextmanager
def _step_state_hidden(optimizer):
    """megatron-core 0.16's distributed optimizer, with torch's Adam (no TE/Apex), copies every
    per-parameter state key from the saved shards, but torch keeps a per-parameter ``step`` that
    the shards do not hold (megatron restores it from the param groups in ``load_state_dict``).
    Hide ``step`` during the copy and put it back afterwards."""
    hidden = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in (inner.state.values() if inner is not None else []):
            if "step" in state:
                hidden.append((state, state.pop("step")))
    try:
        yield
    finally:
        # megatron-core also gives every parameter the *same* step tensor, which torch's Adam
        # increments in place once per parameter; each parameter needs its own.
        for state, step in hidden:
            state["step"] = step.detach().clone()


def load_training_state(load_dir: str, optimizer, scheduler, iteration: Optional[int] = None
                        ) -> dict[str, Any]:
    """Restore optimizer, LR schedule and RNG (model weights were loaded at build time);
    returns the saved ``train_state`` with ``iteration``."""
    dims = parallel_dims()
    it_dir = iteration_dir(Path(load_dir), iteration)
    layout = read_metadata(it_dir).layout
    path = rank_file(it_dir, layout, dims.tp_rank, dims.pp_rank, dims.ep_rank)
    state = load_rank_state(it_dir, layout, dims.tp_rank, dims.pp_rank, dims.ep_rank,
                            mmap=False)
    # With fp32 params the optimizer's "main params" are views of the model parameters, which
    # megatron-core fills in place: that must not be recorded by autograd.
    with torch.no_grad():
        optimizer.load_state_dict(state["optimizer"])
        if uses_distributed_optimizer(optimizer):
            with _step_state_hidden(optimizer):
                optimizer.load_parameter_state(str(path.with_name(DISTRIB_OPTIM_FILE)))
    scheduler.load_state_dict(state["opt_param_scheduler"])
    restore_rng_state(state["rng_state"])
    return {**state.get("train_state", {}), "iteration": int(state["iteration"])}
