"""``GroupedMMExperts``: megatron-core's ``SequentialMLP`` computed with PyTorch's grouped GEMM
(why and how: :mod:`megatron.sft.model.moe.experts`). Its own module because defining the
subclass imports megatron-core's MoE code, which only model construction needs."""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron.sft.model.moe.expert_bias import expert_bias_rows
from megatron.sft.model.moe.experts import ExpertsImplError, grouped_linear


def _glu(config, x: torch.Tensor) -> torch.Tensor:
    """megatron-core's unfused MLP activation (``MLP.forward``), so both modules compute the
    same numbers: ``act(gate) * (up + offset)`` with its optional clamps."""
    if not config.gated_linear_unit:
        return config.activation_func(x)
    gate, up = torch.chunk(x, 2, dim=-1)
    if (val := config.activation_func_clamp_value) is not None:
        gate = gate.clamp(min=None, max=val)
        up = up.clamp(min=-val, max=val)
    return config.activation_func(gate) * (up + config.glu_linear_offset)


class GroupedMMExperts(SequentialMLP):
    """``SequentialMLP``'s parameters computed with two grouped GEMMs (module docstring)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        cfg = self.config
        unsupported = [name for name, on in (
            ("fp8", cfg.fp8), ("fp4", cfg.fp4),
            ("moe_latent_size", cfg.moe_latent_size)) if on]
        if unsupported:
            raise ExpertsImplError(f"--moe-experts-impl grouped_mm does not support "
                                   f"{', '.join(unsupported)}; use --moe-experts-impl sequential")

    def _run_linears_pre_hooks(self) -> None:
        """The experts' linears are read, not called, so run their forward pre-hooks here:
        megatron-core's DDP waits there for its overlapped parameter all-gather
        (``--use-distributed-optimizer`` with DP > 1); without it this forward could read
        weights the all-gather has not written yet."""
        for expert in self.local_experts:
            for linear in (expert.linear_fc1, expert.linear_fc2):
                for key, hook in list(linear._forward_pre_hooks.items()):
                    if key in linear._forward_pre_hooks_with_kwargs:
                        hook(linear, (), {})
                    else:
                        hook(linear, ())

    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        self._run_linears_pre_hooks()
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:  # as SequentialMLP
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        fc1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])  # [E, 2F/tp, H]
        fc2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])  # [E, H, F/tp]
        offs = torch.cumsum(tokens_per_expert.to(x.device), 0).to(torch.int32)
        h = self._with_lora("linear_fc1", grouped_linear(x, fc1, offs), x, offs)
        if (b1 := expert_bias_rows(self, "linear_fc1", tokens_per_expert)) is not None:
            h = h + b1  # expert biases (GPT-OSS): as megatron-core's expert MLP adds them
        h = _glu(self.config, h)
        h = (h * probs.unsqueeze(-1)).to(h.dtype)
        out = self._with_lora("linear_fc2", grouped_linear(h, fc2, offs), h, offs)
        if (b2 := expert_bias_rows(self, "linear_fc2", tokens_per_expert)) is not None:
            out = out + (b2 * probs.unsqueeze(-1)).to(out.dtype)
        return out, None

    def _with_lora(self, linear: str, out: torch.Tensor, x: torch.Tensor,
                   offs: torch.Tensor) -> torch.Tensor:
        """``out`` plus the experts' LoRA updates when their ``linear`` carries adapters
        (:func:`megatron.sft.lora.adapters.expert_update`)."""
        adapters = [getattr(getattr(e, linear), "lora", None) for e in self.local_experts]
        if adapters[0] is None:
            return out
        from megatron.sft.lora.adapters import expert_update

        return out + expert_update(adapters, x, offs, grouped_linear).to(out.dtype)
