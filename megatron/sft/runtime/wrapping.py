"""The model module under its wrappers (megatron-core's DDP, ``Float16Module``, FSDP), which all
keep the wrapped module as ``.module``: hooks, checkpoints and adapters need the bare one."""

from __future__ import annotations


def unwrap_model(model):
    """``DDP(Float16Module(GPTModel))`` -> the ``GPTModel``; a bare module is returned as is."""
    while hasattr(model, "module"):
        model = model.module
    return model
