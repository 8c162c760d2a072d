"""The one collective of our context parallelism: every rank's keys and values, all-gathered
over the CP group and put back in row order (backward: the gradients reduce-scattered).

Each CP rank holds ``s / CP`` tokens of every row (chunks ``r`` and ``2·CP−1−r``, see
:mod:`megatron.sft.model.context_parallel.split`). Attention needs every earlier key of a document, so
each layer gathers K and V, ``[s / CP, b, hkv, d] -> [s, b, hkv, d]``: with GQA they are
``hkv / hq`` of the queries' size, which is why gathering K/V (Llama 3's choice for document
masks) is cheaper than passing queries around a ring. Every rank's queries use every rank's
keys, so in backward each rank's dK, dV are the sum over all ranks' contributions to its own
tokens: a reduce-scatter, which megatron-core's ``gather_from_sequence_parallel_region`` does
for any group (its backward with ``tensor_parallel_output_grad=True``).

Example, ``s = 8``, CP 2: rank 0 holds positions ``[0, 1, 6, 7]``, rank 1 ``[2, 3, 4, 5]``; the
all-gather gives ``[0, 1, 6, 7, 2, 3, 4, 5]`` and ``index_select(0, [0, 1, 4, 5, 6, 7, 2, 3])``
(``cp_split.gather_order``) gives ``[0, ..., 7]``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from megatron.sft.model.context_parallel.split import gather_order


@functools.lru_cache(maxsize=16)
def _order(seq_length: int, cp: int, device: torch.device) -> torch.Tensor:
    return gather_order(seq_length, cp).to(device)


def gather_sequence(x: torch.Tensor, seq_length: int, group: Optional[Any] = None
                    ) -> torch.Tensor:
    """``[s / CP, ...]`` on every CP rank -> ``[s, ...]`` in row order, on every rank (autograd:
    the gradient is reduce-scattered back). ``group`` defaults to this process's CP group."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    if group is None:
        from megatron.sft.runtime.parallel_dims import parallel_dims

        group = parallel_dims().cp_group()
    cp = group.size()
    if x.shape[0] * cp != seq_length:
        raise ValueError(f"context parallel gather: {x.shape[0]} local tokens x CP {cp} is not "
                         f"the row length {seq_length}")
    full = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
    return full.index_select(0, _order(seq_length, cp, x.device))
