"""The optimizer and LR schedule of a run: megatron-core's Adam (distributed when asked) and its
``OptimizerParamScheduler``, whose steps are samples (``--global-batch-size`` per iteration)."""

from __future__ import annotations

from typing import Any

import torch


def wanted_schedule(cfg, train_iters: int) -> dict[str, Any]:
    """The LR schedule the flags ask for, in the scheduler's terms (steps are samples); a
    resume compares it with the saved one."""
    gbs = cfg.global_batch_size
    warmup = cfg.warmup_iters(train_iters)
    return {"max_lr": cfg.lr, "min_lr": cfg.min_lr, "lr_decay_style": cfg.lr_decay_style,
            "lr_warmup_steps": warmup * gbs, "warmup_iters": warmup,
            "lr_decay_steps": max(train_iters * gbs, 1), "start_wd": cfg.weight_decay,
            "train_iters": train_iters}


def build_optimizer(cfg, model: list, tconfig, train_iters: int) -> tuple[Any, Any]:
    """``(optimizer, scheduler)`` for the wrapped ``model`` chunks; the loss is scaled by the
    optimizer (``tconfig.grad_scale_func``)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    ocfg = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=cfg.bf16, params_dtype=torch.bfloat16 if cfg.bf16
        else torch.float32,
        use_distributed_optimizer=cfg.use_distributed_optimizer or cfg.use_megatron_fsdp)
    optimizer = get_megatron_optimizer(ocfg, model)
    tconfig.grad_scale_func = optimizer.scale_loss
    gbs, warmup = cfg.global_batch_size, cfg.warmup_iters(train_iters)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=warmup * gbs, lr_decay_steps=max(train_iters * gbs, 1),
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay, wd_incr_steps=train_iters * gbs,
        wd_incr_style="constant")
    return optimizer, scheduler
