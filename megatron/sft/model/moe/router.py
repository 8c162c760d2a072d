"""The router of our MoE layers: megatron-core's ``TopKRouter`` with the z-loss weighted as on
one rank when a micro-batch's tokens are split over ranks (context parallelism, and TP under
sequence parallelism: megatron-core's ``tp_cp`` group).

Why. We train with ``calculate_per_token_loss`` (every gradient is divided once by the loss
tokens of the global batch), so megatron-core multiplies each routing loss by a token count
before attaching it to the graph. Take one micro-batch of ``T`` real tokens split over ``n``
ranks, rank ``r`` holding ``T_r`` of them:

- **z-loss**: megatron-core 0.16's rank ``r`` takes the mean over its own tokens, divides it by
  ``n`` and multiplies it by ``T_r``: the router's gradient summed over the group is ``1 / n``
  of one rank's (``sum_t d z_t``), and its logged value the mean of unequal per-rank means
  where padding sits on some ranks only. Here rank ``r``'s share is ``sum_{t on r} z_t / T``
  (the shares add up to the micro-batch's mean), multiplied by ``T``. Measured on the tiny
  Qwen2-MoE at z-coefficient 1e-2: the first gradient norm at CP2 was 3.128 against CP1's
  5.229 before, equal after.
- **aux loss**: already one rank's. Rank ``r``'s loss is its share (its own probabilities
  against the group's token counts), multiplied by a count that megatron-core 0.16 takes after
  all-reducing the per-expert counts in place, that is ``T``, as long as a padding mask is
  passed (we always pass one, ``settings.routing_inputs``). The CP2 and TP2 curves in
  ``tests/integration/moe`` would show a change.

With ``n = 1`` every number is megatron-core's own. The values logged per layer
(``moe_utils``' tracker) are the shares, so summed over ``tp_cp`` they are one rank's
(``metrics.MoEMetrics``).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
from megatron.core.transformer.moe.router import TopKRouter


class SplitBatchRouter(TopKRouter):
    """``TopKRouter`` whose z-loss weighs as one rank's over ``tp_cp`` (module docstring); the
    same module, parameters, routing and aux loss otherwise."""

    def apply_z_loss(self, logits, padding_mask: Optional[torch.Tensor] = None):
        coeff = self.config.moe_z_loss_coeff
        split = self.calculate_per_token_loss and self.tp_cp_group.size() > 1
        if not (coeff and self.training and torch.is_grad_enabled() and split):
            return super().apply_z_loss(logits, padding_mask=padding_mask)
        import torch.distributed as dist

        squares = torch.logsumexp(logits, dim=-1).square()
        valid = (torch.ones_like(squares, dtype=torch.bool) if padding_mask is None
                 else ~padding_mask.reshape(-1).to(squares.device))
        total = valid.sum().to(torch.float32)  # the micro-batch's real tokens (a count)
        dist.all_reduce(total, group=self.tp_cp_group)
        total = total.clamp(min=1.0)
        share = (squares * valid).sum() / total * coeff  # the shares sum to the z-loss
        logits = MoEAuxLossAutoScaler.apply(logits, share * total)
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        save_to_aux_losses_tracker("z_loss", share / coeff, self.layer_number, num_layers)
        return logits
