"""``--moe-router-freeze`` / ``--moe-experts-freeze``: train a Mixture-of-Experts model with its
routing or its routed experts held fixed.

- **router**: every parameter of each MoE layer's router (megatron-core's ``TopKRouter``:
  ``weight``, plus ``bias`` where a family has one) stops requiring grad, so DDP gives it no
  gradient buffer and the optimizer never sees it (no update, no weight decay). A family with
  aux-loss-free balancing keeps an ``expert_bias`` *buffer* that megatron-core moves after each
  step by ``moe_router_bias_update_rate``; :func:`freeze_overrides` sets that rate to 0, and
  ``bias + 0 * sign(...)`` is the same bits, so the bias is frozen too.
- **experts**: every parameter of the routed experts (``mlp.experts``) stops requiring grad;
  the shared expert, attention, norms and dense MLPs still train. Under LoRA the base is frozen
  anyway; there the flag means no adapters on the routed experts.

A frozen tensor is saved and exported as it was loaded, bit for bit (the MoE training test
checks this through a save and an HF export).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from megatron.sft.runtime.wrapping import unwrap_model


def moe_layers(chunks: list) -> Iterator[Any]:
    """The MoE layers' MLP modules (those with a router) of the model chunks."""
    for chunk in chunks:
        for layer in unwrap_model(chunk).decoder.layers:
            if hasattr(layer.mlp, "router"):
                yield layer.mlp


def freeze_moe(chunks: list, router: bool, experts: bool) -> int:
    """Stop gradients to the routers and/or the routed experts of ``chunks`` (before DDP and
    the optimizer are built); returns how many parameters of this rank were frozen.

    >>> mlp = torch.nn.Module(); mlp.router = torch.nn.Linear(4, 2, bias=False)
    >>> layer = torch.nn.Module(); layer.mlp = mlp
    >>> model = torch.nn.Module(); model.decoder = torch.nn.Module()
    >>> model.decoder.layers = torch.nn.ModuleList([layer])
    >>> freeze_moe([model], router=True, experts=False), mlp.router.weight.requires_grad
    (8, False)
    """
    count = 0
    for mlp in moe_layers(chunks):
        parts = ([mlp.router] if router else []) + ([mlp.experts] if experts else [])
        for part in parts:
            for p in part.parameters():
                if p.requires_grad:
                    p.requires_grad_(False)
                    count += p.numel()
    return count


def freeze_overrides(router: bool) -> dict[str, Any]:
    """``TransformerConfig`` fields a frozen router needs: the expert-bias update rate 0 (a
    no-op for families without an expert bias)."""
    return {"moe_router_bias_update_rate": 0.0} if router else {}
