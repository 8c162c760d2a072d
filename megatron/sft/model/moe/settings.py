"""Mixture-of-Experts runs: the ``--moe-*`` flags as megatron-core settings, what a MoE run
refuses, and the routing padding mask of a micro-batch.

Routing losses count real tokens only. Packed rows end in padding after their last sample,
unpacked rows after their one sample (``collate_sft``'s ``cu_seqlens`` say where): those
positions are routed like any other (dropless dispatch has room for them) but excluded from
the load-balancing and z losses and from their token counts, through megatron-core's
``padding_mask`` (True = padding). Example, ``seq_length`` 6, rows with ``cu_seqlens``
``[0, 3, 5]`` and ``[0, 6]``::

    padding_mask = [[F F F F F T],
                    [F F F F F F]]
"""

from __future__ import annotations

from typing import Any

import torch

from megatron.sft.bridge.model_shape import ModelShape
from megatron.sft.model.moe.freeze import freeze_overrides


def moe_config_overrides(cfg, shape: ModelShape) -> dict[str, Any]:
    """``TransformerConfig`` fields of a run's ``--moe-*`` flags (``cfg``: ``TrainConfig``);
    unset flags keep the architecture's values (``moe_aux_loss_coeff`` = the HF config's
    ``router_aux_loss_coef``) and megatron-core's defaults (dropless, no z-loss)."""
    if shape.moe is None:
        return {}
    out: dict[str, Any] = {}
    if cfg.moe_token_dispatcher_type is not None:
        out["moe_token_dispatcher_type"] = cfg.moe_token_dispatcher_type
    if cfg.moe_aux_loss_coeff is not None:
        out["moe_aux_loss_coeff"] = cfg.moe_aux_loss_coeff
    if cfg.moe_z_loss_coeff:
        out["moe_z_loss_coeff"] = cfg.moe_z_loss_coeff
    if cfg.moe_expert_capacity_factor is not None:
        out["moe_expert_capacity_factor"] = cfg.moe_expert_capacity_factor
    out.update(freeze_overrides(cfg.moe_router_freeze))
    if shape.moe.expert_bias and not cfg.moe_router_freeze:  # updated in finalize_model_grads
        if cfg.moe_router_freeze_expert_bias:
            out["moe_router_bias_update_rate"] = 0.0
        elif cfg.moe_router_bias_update_rate is not None:
            out["moe_router_bias_update_rate"] = cfg.moe_router_bias_update_rate
    return out


def check_moe_run(cfg, shape: ModelShape) -> None:
    """Refuse, naming the flags and the fix, what megatron-core's MoE layer cannot train."""
    moe_flags = [f for f, v in (("--moe-token-dispatcher-type", cfg.moe_token_dispatcher_type),
                                ("--moe-aux-loss-coeff", cfg.moe_aux_loss_coeff),
                                ("--moe-z-loss-coeff", cfg.moe_z_loss_coeff),
                                ("--moe-expert-capacity-factor",
                                 cfg.moe_expert_capacity_factor),
                                ("--moe-router-freeze", cfg.moe_router_freeze or None),
                                ("--moe-experts-freeze", cfg.moe_experts_freeze or None))
                 if v is not None]
    bias_flags = [f for f, v in (("--moe-router-bias-update-rate",
                                  cfg.moe_router_bias_update_rate is not None),
                                 ("--moe-router-freeze-expert-bias",
                                  cfg.moe_router_freeze_expert_bias)) if v]
    if shape.moe is None:
        if moe_flags or bias_flags:
            raise ValueError(f"{', '.join(moe_flags + bias_flags)}: {shape.architecture} has no "
                             "experts; drop the flag(s)")
        return
    if bias_flags and not shape.moe.expert_bias:
        raise ValueError(f"{', '.join(bias_flags)}: {shape.architecture}'s router has no "
                         "expert bias (DeepSeek-V3's e_score_correction_bias); drop the flag(s)")
    if len(bias_flags) == 2:
        raise ValueError("--moe-router-bias-update-rate with --moe-router-freeze-expert-bias: "
                         "give one (a frozen bias is not updated)")
    if cfg.moe_router_bias_update_rate is not None and cfg.moe_router_bias_update_rate < 0:
        raise ValueError(f"--moe-router-bias-update-rate {cfg.moe_router_bias_update_rate}: "
                         "must be >= 0")
    if cfg.tensor_model_parallel_size > 1 and not cfg.sequence_parallel:
        # Without it every TP rank sends the same tokens to the experts, whose gradients would
        # then count each token TP times; megatron-core's MoE layer refuses to train so.
        raise ValueError(f"--tensor-model-parallel-size {cfg.tensor_model_parallel_size} with "
                         f"a Mixture-of-Experts model ({shape.architecture}) needs "
                         "--sequence-parallel")
    if cfg.lora_rank and cfg.expert_tensor_parallel_size == 1 and \
            cfg.tensor_model_parallel_size > 1:
        # Adapter files are per (TP, PP) rank; with whole experts a TP rank has no file of
        # some EP ranks (ParallelLayout.file_tp_ranks), which the adapter code does not read.
        raise ValueError("--lora-rank with --expert-tensor-parallel-size 1 and "
                         "--tensor-model-parallel-size > 1: not supported; leave "
                         "--expert-tensor-parallel-size unset (= TP)")
    if cfg.moe_expert_capacity_factor is not None and cfg.moe_expert_capacity_factor <= 0:
        raise ValueError(f"--moe-expert-capacity-factor {cfg.moe_expert_capacity_factor}: must "
                         "be positive (leave it unset for dropless routing)")


def routing_padding_mask(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """``[b, s]`` bool, True after each row's last sample (see the module docstring); rows of
    ``cu_seqlens`` are ``collate_sft``'s, right-padded with -1."""
    used = cu_seqlens.max(dim=1).values.to(torch.int64)  # the last valid boundary
    positions = torch.arange(seq_length, device=cu_seqlens.device)
    return positions.unsqueeze(0) >= used.unsqueeze(1)


def stage_padding_mask(mask: torch.Tensor, model, sequence_parallel: bool) -> torch.Tensor:
    """The mask as ``model``'s MoE layers need it. megatron-core 0.16's ``GPTModel`` splits it
    over TP for sequence parallelism only on the first pipeline stage (in ``_preprocess``,
    next to the embedding); later stages get it whole, and it must be split here."""
    while hasattr(model, "module"):
        model = model.module
    if not sequence_parallel or model.pre_process:
        return mask
    from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

    return scatter_to_sequence_parallel_region(mask.transpose(0, 1).contiguous()) \
        .transpose(0, 1).contiguous()


def routing_padding(batch: dict, shape: ModelShape) -> dict[str, torch.Tensor]:
    """``{"padding_mask": [b, s]}`` of a collated micro-batch's whole rows (``{}`` for dense
    models). Made before the batch is cut for context parallelism and cut with the tokens
    (``training.batch.local_micro_batch``; the padding the ``te`` backend's THD layout inserts
    is padding here too), so each CP rank routes its own tokens and counts only its real ones
    in the routing losses, which ``router.SplitBatchRouter`` weighs over the CP group."""
    if shape.moe is None:
        return {}
    return {"padding_mask": routing_padding_mask(batch["cu_seqlens"], batch["tokens"].shape[1])}


def routing_inputs(batch: dict, shape: ModelShape, model, flatten_rows: bool,
                   sequence_parallel: bool) -> dict[str, torch.Tensor]:
    """``GPTModel.forward`` keyword arguments a MoE model's micro-batch needs:
    ``{"padding_mask": ...}`` (this CP rank's, from :func:`routing_padding`) shaped like the
    tokens it is called with (``[1, b*s]`` when the attention backend flattens rows), split
    for this pipeline stage; ``{}`` for dense models."""
    if shape.moe is None:
        return {}
    mask = batch["padding_mask"]
    if flatten_rows:
        mask = mask.reshape(1, -1)
    return {"padding_mask": stage_padding_mask(mask, model, sequence_parallel)}
