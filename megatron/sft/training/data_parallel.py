"""The model chunks wrapped for data parallelism (megatron-core DDP, or Megatron-FSDP), with
the communication overlap settings the pipeline schedules read from the ``TransformerConfig``.

Data-parallel communication overlaps compute by default when there is any: gradients are reduced
bucket by bucket during the backward pass, and with the distributed optimizer the updated
parameters are gathered bucket by bucket during the next forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from megatron.sft.training import fsdp


@dataclass
class DataParallelModel:
    chunks: list                        # DDP-wrapped GPTModel chunks (one per virtual stage)
    tconfig: Any                        # their TransformerConfig, with the sync functions set
    overlap_param_gather: bool          # parameters reach modules in their forward pre-hooks

    def release(self) -> None:
        """Break the cycle megatron-core's DDP (and Megatron-FSDP) forms through autograd: its
        gradient hooks live on C++ grad-accumulator nodes the wrapper keeps in ``grad_accs``,
        and close over the wrapper, so Python's collector never frees the model or the process
        groups it holds (each gloo group keeps polling threads; an FSDP run left ~48). A
        process that builds trainers one after another (the test workers) calls this through
        ``Trainer.close``; the wrappers are unusable afterwards."""
        for m in self.chunks:
            accumulators = getattr(m, "grad_accs", None)
            if isinstance(accumulators, list):
                accumulators.clear()
            wrappers = []
            for module in m.modules():
                _drop_graph_tensors(module)
                # RotaryEmbedding.forward is an lru_cache keyed on the module (and its CP group)
                cache_clear = getattr(type(module).forward, "cache_clear", None)
                if cache_clear is not None:
                    cache_clear()
                if type(module).__name__ in _WRAPPERS:
                    wrappers.append(module)
            for wrapper in wrappers:
                # Megatron-FSDP's hooks (on modules, and on every parameter's gradient
                # accumulation) close over it, as DDP's do: removed
                for attr in _FSDP_HOOK_DICTS:
                    hooks = vars(wrapper).get(attr)
                    if isinstance(hooks, dict):
                        for handle in hooks.values():
                            if hasattr(handle, "remove"):
                                handle.remove()
                        hooks.clear()
            for wrapper in wrappers:
                # the hooks stay on grad-accumulator nodes any leftover graph still reaches;
                # emptied, the wrapper they close over holds nothing (no model, no groups)
                vars(wrapper).clear()
        for name in ("no_sync_func", "grad_sync_func", "param_sync_func"):
            if getattr(self.tconfig, name, None) is not None:
                setattr(self.tconfig, name, None)

    @contextlib.contextmanager
    def parameters_in_sync(self):
        """With overlapped parameter gathering the newest weights reach a module only in its
        next forward pre-hook; saving or evaluating first gathers them all, then re-arms the
        hooks."""
        if not self.overlap_param_gather:
            yield
            return
        for m in self.chunks:
            m.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for m in self.chunks:
                m.enable_forward_pre_hook()


#: data-parallel wrappers whose hooks close over them: megatron-core's DDP, its Megatron-FSDP
#: adapter and Megatron-FSDP itself
_WRAPPERS = ("DistributedDataParallel", "FullyShardedDataParallel", "MegatronFSDP")
#: Megatron-FSDP's dicts of hook handles
_FSDP_HOOK_DICTS = ("forward_pre_hooks", "forward_hooks", "backward_pre_hooks", "grad_acc_hooks")


def _drop_graph_tensors(module) -> None:
    """Forget tensors that still carry an autograd graph from the last forward: megatron-core's
    MoE token dispatchers keep the routing probabilities of the last step, whose graph reaches
    the parameters' grad accumulators and, through DDP's hooks there, the wrapper itself: a
    cycle through C++ that the collector cannot see."""
    import torch

    holders = [module] + [v for v in vars(module).values()
                          if hasattr(v, "__dict__") and not isinstance(v, (torch.nn.Module, type))]
    for holder in holders:
        for name, value in list(vars(holder).items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                setattr(holder, name, None)


def wrap_for_data_parallel(chunks: list, cfg, dp_size: int, device) -> DataParallelModel:
    """``chunks`` (bare GPTModels) wrapped as ``cfg`` asks (``--use-megatron-fsdp``,
    ``--use-distributed-optimizer``, ``--overlap-grad-reduce``, ``--overlap-param-gather``)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    tcfg = chunks[0].config
    overlap_grads = dp_size > 1 and cfg.overlap_grad_reduce
    overlap_params = overlap_grads and cfg.use_distributed_optimizer and cfg.overlap_param_gather
    if cfg.use_megatron_fsdp:  # training/fsdp.py; it gathers parameters in its own hooks
        model = fsdp.wrap(chunks, tcfg, cfg.fsdp_strategy, device=device,
                          overlap_grad_reduce=overlap_grads)
        overlap_grads = model[0].ddp_config.overlap_grad_reduce and dp_size > 1
        overlap_params = False
    else:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grads,
            overlap_param_gather=overlap_params,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
            average_in_collective=False)
        model = [DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=m,
                                         disable_bucketing=i > 0)
                 for i, m in enumerate(chunks)]
    tcfg.finalize_model_grads_func = finalize_model_grads

    def per_chunk(name: str):
        funcs = [getattr(m, name) for m in model]
        return funcs if len(funcs) > 1 else funcs[0]

    if overlap_grads:  # the pipeline schedules start each chunk's reduction when it is done
        tcfg.no_sync_func = per_chunk("no_sync")
        tcfg.grad_sync_func = per_chunk("start_grad_sync")
    if overlap_params:
        tcfg.param_sync_func = per_chunk("start_param_sync")
    return DataParallelModel(model, tcfg, overlap_params)
