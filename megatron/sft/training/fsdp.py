"""Fully sharded data parallel with megatron-core's Megatron-FSDP: wrapping the model chunks,
gathering the sharded weights into our per-(TP, PP) rank files at save time, and the per-rank
optimizer shard files that make resume exact.

Why Megatron-FSDP and not megatron-core's torch FSDP2 wrapper: Megatron-FSDP is what
``--use-megatron-fsdp --data-parallel-sharding-strategy`` configures in Megatron-LM, it keeps
megatron-core's ``DistributedOptimizer``, gradient buffers (``main_grad``, fp32 reduction) and
``finalize_model_grads``, so the per-token SFT loss and the step are the same code as without
FSDP, and it matches that run on CPU to the last bits we measure. The FSDP2 wrapper hard-codes a
``"cuda"`` device mesh and asserts every parameter already sits on ``cuda:0``, which a CPU run
cannot satisfy, and it offers no sharding strategies and no ``main_grad`` buffers.

What a strategy shards over the data-parallel (x context-parallel) ranks, per rank, for N
parameters in bf16 with fp32 gradients and Adam (bytes)::

    strategy             weights   grads   fp32 main + 2 moments
    no_shard             2N        4N      12N
    optim                2N        4N      12N / dp
    optim_grads          2N        4N / dp 12N / dp
    optim_grads_params   2N / dp   4N / dp 12N / dp       (ZeRO-3)

(fp32 weights are their own main weights: 4N + 4N + 8N, each divided the same way.) Against
the distributed optimizer (2N + 4N + 12N/dp) ZeRO-3 is 3/(dp+2) of its bytes in bf16 (0.75 at
DP=2, 0.5 at DP=4) and 2/(dp+1) in fp32; against plain DDP it is 1/dp.

Saving: each parameter group (one transformer layer under ``optim_grads_params``) is gathered
on its own onto the rank that writes the (TP, PP) rank file and moved to host memory, so the
device never holds more than one unsharded group beyond the shards. Every data-parallel rank
also writes its optimizer shard (fp32 main weights and Adam moments, about 12N/dp bytes) as
``fsdp_optim_SSS.pt`` beside the rank file: layout-specific, like ``distrib_optim.pt``.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any, Optional

import torch

from megatron.sft.model.moe.experts import split_grouped_weights

#: one per FSDP shard (data-parallel x context-parallel rank) in each rank directory
OPTIM_SHARD_FILE = "fsdp_optim_{:03d}.pt"


def is_fsdp(model: list) -> bool:
    """Whether the chunks are wrapped in Megatron-FSDP."""
    return bool(getattr(getattr(model[0], "ddp_config", None), "use_megatron_fsdp", False))


def wrap(chunks: list, tconfig, strategy: str, *, overlap_grad_reduce: bool,
         device: torch.device) -> list:
    """Wrap each chunk in megatron-core's ``FullyShardedDataParallel``.

    ``device`` is passed explicitly: Megatron-FSDP allocates its buffers there, also from the
    gradient hooks that run during the backward pass (on CPU, outside the CUDA redirection).
    ``optim_grads`` and ``optim_grads_params`` always overlap the gradient reduce-scatter, and
    ``optim_grads_params`` the parameter all-gather (Megatron-FSDP sets both itself).
    """
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.fsdp import mcore_fsdp_adapter
    from megatron.core.distributed.fsdp.mcore_fsdp_adapter import FullyShardedDataParallel

    if not isinstance(mcore_fsdp_adapter.TELinear, type):
        # Without Transformer Engine megatron-core's TELinear is a MagicMock, and the adapter's
        # `isinstance(module, (TELinear,))` (asked of every module when TP > 1) raises
        # TypeError. No module is a TELinear then: a class nothing derives from says exactly so.
        mcore_fsdp_adapter.TELinear = type("TransformerEngineAbsent", (), {})
    if device.type == "cpu":  # it warns that the device is not cuda:{current_device()}
        logging.getLogger("megatron.core.distributed.fsdp.src.megatron_fsdp.megatron_fsdp") \
            .addFilter(lambda record: "instead of the current device" not in record.getMessage())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=True, use_megatron_fsdp=True,
        data_parallel_sharding_strategy=strategy, average_in_collective=False,
        # fp32 weights are their own main weights: a second fp32 copy would cost 4N/dp bytes
        preserve_fp32_weights=tconfig.params_dtype != torch.float32)
    return [FullyShardedDataParallel(config=tconfig, ddp_config=ddp_config, module=m,
                                     device=device, disable_bucketing=i > 0)
            for i, m in enumerate(chunks)]


def _buffers(chunk):
    """Megatron-FSDP's ``ParamAndGradBuffer`` of a wrapped chunk."""
    return chunk.module.param_and_grad_buffer


def model_dtype(model: list) -> torch.dtype:
    """The training weights' dtype (the wrapped module's parameters may be fp32 main shards)."""
    group = _buffers(model[0]).parameter_groups[0]
    buf = group.model_weight_buffer
    return buf.dtype if buf is not None else group.params[0].dtype


def shard_group(chunk):
    """The process group the dense weights are sharded over (data x context parallel)."""
    return chunk.module.dist_index.get_fsdp_group()


def gathered_state_dicts(model: list, keep: bool) -> Optional[list[dict[str, torch.Tensor]]]:
    """Every chunk's full (this TP/PP rank's) ``state_dict``, on host memory, on the ranks with
    ``keep`` (the rank-file writers: rank 0 of their shard group); collective over the shard
    group, so every rank calls it. Groups are gathered one at a time."""
    out = []
    for chunk in model:
        buffers = _buffers(chunk)
        weights: dict[str, torch.Tensor] = {}
        for group in buffers.parameter_groups:
            for param, tensor in zip(group.params, _gather_group(group, keep)):
                if keep:  # grouped experts' 3-D weights under their checkpoint names
                    weights.update(split_grouped_weights(buffers.param_to_name[param], tensor))
        if not keep:
            out.append(None)
            continue
        module = chunk.module.module
        # buffers and extra state as the module has them, weights in their order and names
        full = {}
        for key, value in module.state_dict().items():
            full[key] = weights.pop(key) if key in weights else value
        missing = [k for k in weights if k not in full]
        if missing:
            raise RuntimeError(f"gathered weights with no state_dict entry: {missing[:6]}")
        out.append(full)
    return out if keep else None


def _gather_group(group, keep: bool) -> list:
    """The parameters of one Megatron-FSDP parameter group, unsharded, as host tensors where
    ``keep`` (else ``None``s). A group's buffer is contiguous and each rank owns one equal
    (padded) shard of it, so gathering the shards to the writer rebuilds it."""
    import torch.distributed as dist

    buf = group.model_weight_buffer
    if buf is None:  # no_shard: every rank holds the whole parameters
        return [p.detach().cpu().clone() if keep else None for p in group.params]
    shard = buf.get_shard_from_local_buffer()
    pg = buf.data_parallel_group
    size = pg.size()
    if shard.numel() * size != buf.bucket_index.size:
        raise RuntimeError(f"Megatron-FSDP bucket of {buf.bucket_index.size} elements is not "
                           f"{size} shards of {shard.numel()}")
    parts = [torch.empty_like(shard) for _ in range(size)] if keep else None
    if keep and dist.get_rank(pg) != 0:
        raise RuntimeError("the rank-file writer must be rank 0 of its FSDP shard group")
    dist.gather(shard.contiguous(), gather_list=parts, dst=dist.get_global_rank(pg, 0),
                group=pg)
    if not keep:
        return [None] * len(group.params)
    bucket = types.SimpleNamespace(data=torch.cat(parts))
    tensors = [buf.get_item_from_bucket(bucket, i).view(p.shape).cpu().clone()
               for i, p in enumerate(group.params)]
    del bucket, parts
    return tensors


# ---------------------------------------------------------------------- optimizer shard files
def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _local(value):
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.to_local()
    return value.detach().cpu().clone() if torch.is_tensor(value) else value


def shard_file(rank_dir: Path, shard: int) -> Path:
    return Path(rank_dir) / OPTIM_SHARD_FILE.format(shard)


def optimizer_shard_state(optimizer, strategy: str, shards: int) -> dict[str, Any]:
    """This rank's optimizer shard: each inner optimizer's ``state_dict`` with local tensors,
    and its fp32 main weight shards (bf16 runs would otherwise resume from bf16 weights)."""
    parts = []
    for opt in _optimizers(optimizer):
        inner = opt.optimizer.state_dict()
        parts.append({
            "state": {i: {k: _local(v) for k, v in s.items()} for i, s in inner["state"].items()},
            "param_groups": inner["param_groups"],
            "main": [[_local(p) for p in g["params"]] for g in opt.optimizer.param_groups],
            "grad_scaler": opt.grad_scaler.state_dict() if opt.grad_scaler else None,
        })
    return {"strategy": strategy, "shards": shards, "optimizers": parts}


def optimizer_shard_nbytes(optimizer) -> int:
    """About the bytes of this rank's shard file: main weights and state tensors."""
    from torch.distributed.tensor import DTensor

    total = 0
    for opt in _optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                local = p.to_local() if isinstance(p, DTensor) else p
                total += local.numel() * 4
                for v in opt.optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v):
                        v = v.to_local() if isinstance(v, DTensor) else v
                        total += v.numel() * v.element_size()
    return total


@torch.no_grad()
def load_optimizer_shard_state(saved: dict[str, Any], optimizer, model: list, path: Path) -> None:
    """Restore :func:`optimizer_shard_state` into a freshly built optimizer of the same layout
    (the caller checked strategy and shard count), then install the main weights into the
    model's weights as an optimizer step does."""
    from torch.distributed.tensor import DTensor

    opts = _optimizers(optimizer)
    if len(saved["optimizers"]) != len(opts):
        raise ValueError(f"{path} holds {len(saved['optimizers'])} optimizer(s), this run has "
                         f"{len(opts)}; pass --no-load-optim")
    for opt, part in zip(opts, saved["optimizers"]):
        inner = opt.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        mains = [m for g in part["main"] for m in g]
        shapes = [tuple((p.to_local() if isinstance(p, DTensor) else p).shape) for p in params]
        if [tuple(m.shape) for m in mains] != shapes:
            raise ValueError(f"{path} holds optimizer shards of other shapes than this run's "
                             "(another model, TP size or LoRA targets); pass --no-load-optim")
        inner.load_state_dict({"state": part["state"], "param_groups": part["param_groups"]})
        for p, main in zip(params, mains):
            (p.to_local() if isinstance(p, DTensor) else p).copy_(main)
            state = inner.state.get(p, {})
            for key, value in list(state.items()):
                if key == "step" and torch.is_tensor(value):
                    state[key] = value.clone()  # one counter per parameter
                elif isinstance(p, DTensor) and torch.is_tensor(value) \
                        and not isinstance(value, DTensor):
                    wrapped = torch.zeros_like(p)  # the parameter's sharding, then the values
                    wrapped.to_local().copy_(value)
                    state[key] = wrapped
        if part["grad_scaler"] is not None and opt.grad_scaler is not None:
            opt.grad_scaler.load_state_dict(part["grad_scaler"])
    for chunk in model:
        _buffers(chunk).copy_main_weights_to_model_weights()
        chunk.start_param_sync(force_sync=True)


# ---------------------------------------------------------------------- memory accounting
def state_bytes(model: list, optimizer) -> dict[str, int]:
    """Bytes this rank holds for weights, gradients and optimizer state (fp32 main weights that
    are not the weights themselves, Adam moments), counting each storage once: what a memory
    table compares across data-parallel layouts. Works for DDP and Megatron-FSDP chunks."""
    from torch.distributed.tensor import DTensor

    seen: set = set()

    def nbytes(t) -> int:
        if t is None:
            return 0
        if isinstance(t, DTensor):
            t = t.to_local()
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            return 0
        seen.add(key)
        return storage.nbytes()

    out = {"params": 0, "grads": 0, "optimizer": 0}
    for chunk in model:
        if is_fsdp([chunk]):
            for group in _buffers(chunk).parameter_groups:
                if group.model_weight_buffer is not None:
                    out["params"] += nbytes(group.model_weight_buffer.data)
                else:
                    out["params"] += sum(nbytes(p) for p in group.params)
                if group.main_grad_buffer is not None:
                    out["grads"] += nbytes(group.main_grad_buffer.data)
                if group.main_weight_buffer is not None:
                    out["optimizer"] += nbytes(group.main_weight_buffer.data)
        else:
            for buffer in chunk.buffers + chunk.expert_parallel_buffers:
                out["params"] += nbytes(buffer.param_data)
                out["grads"] += nbytes(buffer.grad_data)
            for p in chunk.module.parameters():
                out["params"] += nbytes(p)
    for opt in _optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                out["optimizer"] += nbytes(p)
                for v in opt.optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.dim() > 0:
                        out["optimizer"] += nbytes(v)
    return out
