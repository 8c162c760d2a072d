"""Compat shim: mark tensor-parallel weights that megatron-core 0.16 leaves unmarked when a model
is built without initialisation.

megatron-core sets ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride`` on a
``ColumnParallelLinear``, ``RowParallelLinear`` or ``VocabParallelEmbedding`` weight only inside
its weight-initialisation functions (``_initialize_affine_weight_cpu`` / ``_gpu``), which are
skipped with ``perform_initialization=False``: what we build with, since every weight is loaded
from the checkpoint right after. Unmarked, a TP-split weight looks replicated, and megatron-core's
gradient norm (``param_is_not_tensor_parallel_duplicate``: a parameter counts on every rank if it
is TP-split, else on TP rank 0 only) drops the shards of every TP rank but 0: at TP2 the norm of
the tiny test model read 3.39 instead of TP1's 4.45, and ``--clip-grad`` clipped by it.

:func:`mark_tensor_parallel_weights` gives each such weight the marks its class implies (column
and embedding: split by output rows, dim 0; row: split by input columns, dim 1), leaving
weights that are already marked (initialised builds, Transformer Engine modules, LoRA adapters)
as they are.

Example (no process group needed)::

    >>> class RowParallelLinear(torch.nn.Module):  # the name is what is read
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.weight = torch.nn.Parameter(torch.zeros(4, 2))
    >>> m = torch.nn.Sequential(RowParallelLinear())
    >>> mark_tensor_parallel_weights(m), m[0].weight.partition_dim
    (1, 1)
"""

from __future__ import annotations

import torch

#: megatron-core class name -> the dimension its weight is split along over TP ranks
PARTITION_DIM = {"ColumnParallelLinear": 0, "RowParallelLinear": 1, "VocabParallelEmbedding": 0}


def mark_tensor_parallel_weights(model: torch.nn.Module) -> int:
    """Mark the unmarked TP-split weights of ``model``; returns how many were marked."""
    marked = 0
    for module in model.modules():
        dim = PARTITION_DIM.get(type(module).__name__)
        weight = getattr(module, "weight", None)
        if dim is None or not isinstance(weight, torch.nn.Parameter):
            continue
        if getattr(weight, "tensor_model_parallel", False):
            continue
        weight.tensor_model_parallel = True
        weight.partition_dim = dim
        weight.partition_stride = 1
        marked += 1
    return marked
