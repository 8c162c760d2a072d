"""Save and resume training checkpoints in the Megatron-LM layout the export script reads.

Each rank writes ``iter_N.partial/mp_rank_TT[_PPP]/model_optim_rng.pt`` (model chunks in the
checkpoint naming, optimizer, LR schedule, RNG, iteration); with the distributed optimizer
each data-parallel group also writes ``distrib_optim.pt`` there; under Megatron-FSDP the weights
are gathered into the same rank files and every data-parallel rank writes its optimizer shard
``fsdp_optim_SSS.pt`` there (:mod:`training.fsdp`). After a barrier, rank 0 renames
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

from megatron.sft.model.layer_impl import LayerImpl
from megatron.sft.bridge.checkpoint_io import (
    CHECKPOINT_VERSION,
    CheckpointError,
    CheckpointMetadata,
    dtype_name,
    iteration_dir,
    load_file_state,
    load_rank_state,
    partial_iteration_dir,
    publish_iteration,
    rank_file,
    read_metadata,
    save_file_state,
    save_rank_state,
    state_nbytes,
    write_metadata,
    written_by_training,
)
from megatron.sft.bridge.integrity import file_digest, verify_file, write_checksums
from megatron.sft.runtime.collective import on_every_rank
from megatron.sft.runtime.disk import check_free_space, disk_full_guard
from megatron.sft.runtime.layout import iteration_dir_name
from megatron.sft.runtime.parallel_dims import parallel_dims

from megatron.sft.lora.run_format import read_lora_info, write_lora_info
from megatron.sft.lora.settings import adapter_state_dict
from megatron.sft.model.moe.experts import trains_grouped_experts
from megatron.sft.training import fsdp
from megatron.sft.training.resume import optimizer_layout, saved_optimizer_settings
from megatron.sft.runtime.wrapping import unwrap_model

DISTRIB_OPTIM_FILE = "distrib_optim.pt"


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
    """Write iteration ``iteration`` into ``save_dir`` from every rank; ``lora`` (a
    ``LoRACheckpointInfo``): save only the adapters, plus ``lora.json``.

    Nothing is lost when a save fails (a full disk, a rank that cannot write): every rank hears
    the same error, the partial directory is removed and the previous complete iteration stays
    the latest. An iteration that a training run did not write (a converted base in the same
    directory) is never replaced or pruned.
    """
    import torch.distributed as dist

    dims = parallel_dims()
    save = Path(save_dir)
    partial = partial_iteration_dir(save, iteration)
    final = save / iteration_dir_name(iteration)
    rank0 = dist.get_rank() == 0
    sharded = fsdp.is_fsdp(model)
    dtype = fsdp.model_dtype(model) if sharded else next(unwrap_model(model[0]).parameters()).dtype
    meta_now = dataclasses.replace(meta, params_dtype=dtype_name(dtype), producer="training")
    # Megatron-FSDP: every rank takes part in gathering the weights, group by group
    gathered = fsdp.gathered_state_dicts(model, keep=dims.writes_rank_file) if sharded else None
    saved_layout = _optimizer_layout(model, optimizer)
    state: Optional[dict[str, Any]] = None
    if dims.writes_rank_file:
        state = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
            "sft_metadata": meta_now.to_dict(),
            "optimizer": optimizer.state_dict(),
            "opt_param_scheduler": scheduler.state_dict(),
            "rng_state": rng_state(),
            "train_state": dict(train_state),
            "optimizer_layout": saved_layout,
        }
        for chunk, m in enumerate(model):
            sd = impl.model_to_checkpoint(gathered[chunk] if sharded else unwrap_model(m).state_dict())
            state[meta.layout.model_key(chunk)] = sd if lora is None else adapter_state_dict(sd)
    del gathered
    distributed_optimizer = uses_distributed_optimizer(optimizer) and not sharded
    sizes = on_every_rank(lambda: _save_size_estimate(state, optimizer, distributed_optimizer)
                          + (fsdp.optimizer_shard_nbytes(optimizer) if sharded else 0),
                          gather=True)

    def prepare() -> None:
        if not rank0:
            return
        if final.exists() and not written_by_training(final):
            raise CheckpointError(
                f"{final} was written by {read_metadata(final).producer or 'a converter'}, not "
                f"by a training run: saving iteration {iteration} there would replace it. Use "
                "another --save directory than the converted checkpoint")
        check_free_space(save, sum(sizes), f"checkpoint {final.name}")
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)

    on_every_rank(prepare)
    rank_path = rank_file(partial, meta.layout, dims.tp_rank, dims.pp_rank, dims.ep_rank)

    def write() -> list:
        digests = []
        rank_path.parent.mkdir(parents=True, exist_ok=True)
        if sharded:  # each rank its own shard: nothing is gathered
            shard = fsdp.shard_file(rank_path.parent, saved_layout["shard"])
            digests.append(save_file_state(partial, shard, fsdp.optimizer_shard_state(
                optimizer, saved_layout["strategy"], saved_layout["shards"])))
        if distributed_optimizer:
            # Collective over the data-parallel group; its rank 0 writes the gathered shards
            # (megatron-core's torch.save: hashed by reading it back).
            optim_path = rank_path.with_name(DISTRIB_OPTIM_FILE)
            with disk_full_guard(save, sum(sizes), f"{optim_path.name} of {final.name}"):
                optimizer.save_parameter_state(str(optim_path))
            if optim_path.exists() and dims.writes_rank_file:  # its writer
                digests.append(file_digest(optim_path, optim_path.relative_to(partial)
                                           .as_posix()))
        if state is not None:
            digests.append(save_rank_state(partial, meta.layout, dims.tp_rank, dims.pp_rank,
                                           state, dims.ep_rank))
        return digests

    try:
        digests = [d for rank in on_every_rank(write, gather=True) for d in rank]

        def publish() -> Path:
            if not rank0:
                return final
            write_metadata(partial, meta_now)
            if lora is not None:
                write_lora_info(partial, lora)
            write_checksums(partial, digests)
            published = publish_iteration(save, iteration)
            _prune(save, keep_last)
            return published

        return on_every_rank(publish)
    except BaseException:
        if rank0:  # the previous complete iteration stays the latest
            shutil.rmtree(partial, ignore_errors=True)
        raise


def _optimizer_layout(model: list, optimizer) -> dict[str, Any]:
    """How this run's optimizer state is saved, as the rank file records it for the resume
    check (``resume.optimizer_layout``; under FSDP plus which shard this rank writes)."""
    grouped = trains_grouped_experts(model)
    if not fsdp.is_fsdp(model):
        return optimizer_layout(fsdp=None, distributed=uses_distributed_optimizer(optimizer),
                                shards=1, grouped_experts=grouped)
    import torch.distributed as dist

    group = fsdp.shard_group(model[0])
    return {**optimizer_layout(fsdp=model[0].ddp_config.data_parallel_sharding_strategy,
                               distributed=True, shards=group.size(), grouped_experts=grouped),
            "shard": dist.get_rank(group)}


def saved_optimizer_layout(state: dict[str, Any], rank_path: Path) -> dict[str, Any]:
    """How the optimizer state of a rank file was saved; checkpoints from before this was
    recorded tell by their files."""
    saved = state.get("optimizer_layout")
    if saved is not None:
        return {k: v for k, v in saved.items() if k != "shard"}
    return optimizer_layout(fsdp=None, distributed=rank_path.with_name(DISTRIB_OPTIM_FILE)
                            .exists(), shards=1)


def _save_size_estimate(state: Optional[dict], optimizer, distributed: bool) -> int:
    """Bytes this rank is about to write: its rank file's tensors, plus (on data-parallel rank
    0, which writes the gathered shards) the distributed optimizer's fp32 main weights and two
    Adam moments of its model-parallel part."""
    total = state_nbytes(state) if state is not None else 0
    if distributed and parallel_dims().writes_rank_file:
        params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        total += 12 * params
    return total


def _prune(save: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` iterations this job's training runs wrote; an iteration it
    did not write (a converted base, a reshard) is never removed."""
    if keep_last <= 0:
        return
    iters = sorted(p for p in save.glob("iter_*") if p.is_dir() and not p.name.endswith("partial")
                   and written_by_training(p))
    for old in iters[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class ResumeSource:
    """What a ``--load`` checkpoint holds for resuming (read before the model is built)."""

    iteration: int
    train_state: dict[str, Any]
    #: megatron-core's scheduler state (``None``: none saved)
    schedule: Optional[dict[str, Any]]
    #: optimizer state to restore (a resharded training checkpoint carries none)
    has_optimizer: bool
    #: how that optimizer state was saved (``resume.optimizer_layout``); ``None`` without one
    optimizer_layout: Optional[dict[str, Any]] = None
    #: the Adam settings in that state (``resume.saved_optimizer_settings``)
    optimizer_settings: Optional[dict[str, float]] = None


def peek_resume(cfg) -> Optional[ResumeSource]:
    """The training state ``cfg.load`` resumes, or ``None`` when it starts a run (a converted
    checkpoint, or a LoRA run's base). Read on every rank from its own file, so a damaged file
    is the same error everywhere."""
    it_dir = iteration_dir(Path(cfg.load))
    if cfg.lora_rank and read_lora_info(it_dir) is None:
        return None  # a base: its optimizer (if any) belongs to other parameters
    dims = parallel_dims()
    layout = read_metadata(it_dir).layout
    state = on_every_rank(lambda: load_rank_state(it_dir, layout, dims.tp_rank, dims.pp_rank,
                                                  dims.ep_rank, verify=cfg.verify))
    if "optimizer" not in state and "train_state" not in state:
        return None
    has_optimizer = "optimizer" in state
    saved = saved_optimizer_layout(state, rank_file(it_dir, layout, dims.tp_rank, dims.pp_rank,
                                                    dims.ep_rank)) if has_optimizer else None
    return ResumeSource(int(state["iteration"]), dict(state.get("train_state", {})),
                        state.get("opt_param_scheduler"), has_optimizer, saved,
                        saved_optimizer_settings(state["optimizer"]) if has_optimizer else None)


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


def _load_fsdp_optimizer(it_dir: Path, path: Path, optimizer, model: list, verify: bool) -> None:
    """This rank's ``fsdp_optim_SSS.pt`` into the optimizer (the resume plan checked that the
    checkpoint was saved with the same strategy and shard count)."""
    import torch.distributed as dist

    shard = fsdp.shard_file(path.parent, dist.get_rank(fsdp.shard_group(model[0])))

    def read() -> dict[str, Any]:
        if not shard.exists():
            raise CheckpointError(f"{shard} is missing: the checkpoint holds no Megatron-FSDP "
                                  "optimizer shard for this rank; resume with its setting, or "
                                  "pass --no-load-optim")
        if verify:
            verify_file(it_dir, shard)
        return load_file_state(shard, mmap=False)

    saved = on_every_rank(read)
    fsdp.load_optimizer_shard_state(saved, optimizer, model, shard)


def load_training_state(load_dir: str, optimizer, scheduler, iteration: Optional[int] = None,
                        *, optimizer_state: bool = True, override_schedule: bool = False,
                        verify: bool = True, fsdp_model: Optional[list] = None
                        ) -> dict[str, Any]:
    """Restore optimizer (unless ``optimizer_state`` is false: a resharded checkpoint), LR
    schedule and RNG (model weights were loaded at build time); returns the saved
    ``train_state`` with ``iteration``. ``override_schedule``: the scheduler keeps the flags'
    values and only takes the step count from the checkpoint. ``fsdp_model``: the Megatron-FSDP
    chunks, whose optimizer comes from this rank's shard file."""
    dims = parallel_dims()
    it_dir = iteration_dir(Path(load_dir), iteration)
    layout = read_metadata(it_dir).layout
    path = rank_file(it_dir, layout, dims.tp_rank, dims.pp_rank, dims.ep_rank)
    state = on_every_rank(lambda: load_rank_state(it_dir, layout, dims.tp_rank, dims.pp_rank,
                                                  dims.ep_rank, mmap=False, verify=verify))
    if optimizer_state and fsdp_model is not None:
        _load_fsdp_optimizer(it_dir, path, optimizer, fsdp_model, verify)
    elif optimizer_state:
        optim_path = path.with_name(DISTRIB_OPTIM_FILE)
        distributed = uses_distributed_optimizer(optimizer)
        if distributed and verify:
            on_every_rank(lambda: optim_path.exists() and verify_file(it_dir, optim_path))
        # With fp32 params the optimizer's "main params" are views of the model parameters,
        # which megatron-core fills in place: that must not be recorded by autograd.
        with torch.no_grad():
            optimizer.load_state_dict(state["optimizer"])
            if distributed:
                with _step_state_hidden(optimizer):
                    optimizer.load_parameter_state(str(optim_path))
    if "opt_param_scheduler" in state:
        if override_schedule:
            scheduler.override_opt_param_scheduler = True
            scheduler.use_checkpoint_opt_param_scheduler = False
        scheduler.load_state_dict(state["opt_param_scheduler"])
        # megatron-core's scheduler reads each param group's own max_lr / min_lr before its
        # own; the groups hold the checkpoint's (optimizer state just restored) or this run's
        # flags (a fresh optimizer): make them the schedule that was decided.
        for group in optimizer.param_groups:
            group["max_lr"], group["min_lr"] = scheduler.max_lr, scheduler.min_lr
        scheduler.step(increment=0)  # re-apply the LR at the restored step
    if optimizer_state and "rng_state" in state:
        restore_rng_state(state["rng_state"])
    return {**state.get("train_state", {}), "iteration": int(state["iteration"])}
