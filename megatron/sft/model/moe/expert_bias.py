"""Expert biases for ``GroupedMMExperts`` (GPT-OSS's ``gate_up_proj_bias`` / ``down_proj_bias``):
each token's expert's bias, added as megatron-core's expert ``MLP`` adds its own.

megatron-core's expert MLP (``add_bias_linear``) adds ``linear_fc1.bias`` before the activation
and ``linear_fc2.bias * prob`` after ``linear_fc2`` (``MLP.forward`` with ``per_token_scale``).
The tokens reach the experts sorted by expert, so the rows of the biases are the local experts'
biases repeated by ``tokens_per_expert``. Example, 2 local experts receiving 2 and 1 tokens:
``rows = [b0, b0, b1]``.
"""

from __future__ import annotations

from typing import Optional

import torch


def expert_bias_rows(experts: torch.nn.Module, linear: str,
                     tokens_per_expert: torch.Tensor) -> Optional[torch.Tensor]:
    """``[tokens, n]``: every token's expert's ``linear`` bias (``linear_fc1``/``linear_fc2``),
    or ``None`` when the experts have none (differentiable in the biases)."""
    biases = [getattr(e, linear).bias for e in experts.local_experts]
    if biases[0] is None:
        return None
    stacked = torch.stack(biases)
    counts = tokens_per_expert.to(stacked.device).long()
    return stacked.repeat_interleave(counts, dim=0, output_size=None)
