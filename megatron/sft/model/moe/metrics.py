"""Per-layer routing health of a Mixture-of-Experts run, once per iteration: each MoE layer's
auxiliary (load-balancing) loss, z-loss when on, and load imbalance.

- **Auxiliary loss**: megatron-core's own value, which its router records per layer and
  micro-batch (``moe_utils``' layer-wise tracker, without the coefficient), summed over the
  ranks that hold one micro-batch's tokens (pipeline stages, sequence-parallel TP ranks),
  averaged over micro-batches and data-parallel ranks. For one micro-batch of ``T`` real
  tokens, ``E`` experts, top-``k``: ``E / (k T^2) * sum_e P_e * N_e`` with ``P_e`` the summed
  softmax probability of expert ``e`` and ``N_e`` the tokens routed to it (1.0 when balanced).
- **Expert-bias drift** (routers with one, DeepSeek-V3): per MoE layer the largest
  ``|expert_bias - its value at start|`` over the experts, after megatron-core's update in
  ``finalize_model_grads`` (``--moe-router-bias-update-rate``; 0 under
  ``--moe-router-freeze-expert-bias``).
- **Load imbalance**: tokens routed to the busiest expert over the mean per expert, over the
  whole global batch (1.0 = perfectly even), counted by a forward hook on each router from its
  routing map; padding excluded, as in the losses.

Records are flat scalars (``moe/aux_loss/layer_03``...) so the JSON log, TensorBoard and W&B
take them as they are; :func:`console_summary` is the short form for the console line.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.sft.runtime.wrapping import unwrap_model

_TRACKED = {"load_balancing_loss": "aux_loss", "z_loss": "z_loss"}


class MoEMetrics:
    """Hooks the routers of ``chunks``; :meth:`collect` returns one iteration's metrics (a
    collective: every rank calls it) and starts the next iteration's counts."""

    def __init__(self, chunks: list, num_layers: int, moe_layers, num_experts: int,
                 groups: dict[str, Any], aux_loss: bool, z_loss: bool,
                 has_bias: bool = False):
        """``moe_layers``: every MoE layer of the model (0-based global indices), not only
        this rank's: the reduced tensors hold them all. ``groups``:
        ``ParallelDims.routing_groups``. ``aux_loss`` / ``z_loss``: whether the run has them
        (known on every rank, so every rank joins the same collectives, whatever its stage);
        ``has_bias``: the routers have an expert bias whose drift is logged."""
        self.num_layers, self.num_experts = num_layers, num_experts
        self.moe_layers = sorted(moe_layers)
        self.groups = groups
        self.tracked = [n for n, on in (("load_balancing_loss", aux_loss), ("z_loss", z_loss))
                        if on]
        self.counts: Optional[torch.Tensor] = None
        #: (layer index, the router's live expert bias, its value at start)
        self.biases: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for chunk in chunks:
            for layer in unwrap_model(chunk).decoder.layers:
                router = getattr(layer.mlp, "router", None)
                if router is not None:
                    router.register_forward_hook(self._count, with_kwargs=True)
                    bias = getattr(router, "expert_bias", None)
                    if bias is not None:
                        self.biases.append((router.layer_number - 1, bias,
                                            bias.detach().clone()))
        self.has_bias = has_bias

    def _count(self, router, args, kwargs, output) -> None:
        # Once per token: not in evaluation, and not in the no-grad first pass of full
        # activation recompute (its recomputation counts it).
        if not (router.training and torch.is_grad_enabled()):
            return
        _, routing_map = output
        padding = kwargs.get("padding_mask", args[1] if len(args) > 1 else None)
        routed = routing_map
        if padding is not None:
            routed = routing_map & ~padding.reshape(-1, 1).to(routing_map.device)
        if self.counts is None:
            self.counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64,
                                      device=routing_map.device)
        self.counts[router.layer_number - 1] += routed.sum(dim=0).to(torch.float64)

    def collect(self, num_microbatches: int) -> dict[str, float]:
        import torch.distributed as dist
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
        )

        g = self.groups
        device = self.counts.device if self.counts is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
            else torch.device("cpu"))
        out: dict[str, float] = {}
        tracker = get_moe_layer_wise_logging_tracker()
        for name in self.tracked:
            key = _TRACKED[name]
            values = (tracker[name]["values"].to(torch.float64).clone() if name in tracker
                      else torch.zeros(self.num_layers, dtype=torch.float64, device=device))
            dist.all_reduce(values, group=g["pp"])  # each layer lives on one stage
            # Shares of the ranks sharing a micro-batch (tp_cp): megatron-core's aux loss and
            # our router's z-loss (router.SplitBatchRouter) sum to the micro-batch's values.
            dist.all_reduce(values, group=g["tp_cp"])
            dist.all_reduce(values, group=g["dp"])
            values /= dist.get_world_size(g["dp"]) * max(num_microbatches, 1)
            for layer in self.moe_layers:
                out[f"moe/{key}/layer_{layer:02d}"] = float(values[layer])
        clear_aux_losses_tracker()
        if self.has_bias:
            drift = torch.zeros(self.num_layers, dtype=torch.float64, device=device)
            for layer, bias, start in self.biases:
                drift[layer] = (bias.detach() - start).abs().max().to(torch.float64)
            dist.all_reduce(drift, op=dist.ReduceOp.MAX, group=g["pp"])  # a layer per stage
            for layer in self.moe_layers:
                out[f"moe/expert_bias_drift/layer_{layer:02d}"] = float(drift[layer])
        counts = self.counts if self.counts is not None else torch.zeros(
            self.num_layers, self.num_experts, dtype=torch.float64, device=device)
        for group in (g["pp"], g["split"], g["dp"]):
            dist.all_reduce(counts, group=group)
        for layer in self.moe_layers:
            row = counts[layer]
            if row.sum() > 0:
                out[f"moe/imbalance/layer_{layer:02d}"] = float(row.max() / row.mean())
        self.counts = None
        return out


def moe_metrics_for(chunks: list, shape, dims, config) -> Optional[MoEMetrics]:
    """The metrics of a built model (``None`` for a dense one); ``dims``: ``ParallelDims``,
    ``config``: the chunks' ``TransformerConfig``."""
    if shape.moe is None:
        return None
    return MoEMetrics(chunks, shape.num_layers, shape.moe.layers, shape.moe.num_experts,
                      dims.routing_groups(config.sequence_parallel),
                      aux_loss=(config.moe_aux_loss_coeff or 0) > 0,
                      z_loss=bool(config.moe_z_loss_coeff),
                      has_bias=bool(config.moe_router_enable_expert_bias))


def console_summary(record: dict[str, Any], per_layer_up_to: int = 8) -> Optional[str]:
    """``aux 1.012/1.034 | imbalance 1.20/1.55``: per MoE layer when there are at most
    ``per_layer_up_to`` of them, else the mean and the worst layer; ``None`` without metrics."""
    parts = []
    for key, label in (("aux_loss", "aux"), ("z_loss", "z"), ("imbalance", "imbalance"),
                       ("expert_bias_drift", "bias drift")):
        items = sorted((k, v) for k, v in record.items() if k.startswith(f"moe/{key}/"))
        if not items:
            continue
        values = [v for _, v in items]
        if len(values) <= per_layer_up_to:
            parts.append(f"{label} " + "/".join(f"{v:.3f}" for v in values))
        else:
            worst = max(items, key=lambda kv: kv[1])
            parts.append(f"{label} mean {sum(values) / len(values):.3f} max {worst[1]:.3f} "
                         f"(layer {int(worst[0].rsplit('_', 1)[1])})")
    return " | ".join(parts) or None
