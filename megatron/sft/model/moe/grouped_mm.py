"""``GroupedMMExperts``: megatron-core's ``SequentialMLP`` with each projection of its local
experts held as one 3-D parameter and computed with PyTorch's grouped GEMM (why and how:
:mod:`megatron.sft.model.moe.experts`). Its own module because defining the subclass imports
megatron-core's MoE code, which only model construction needs."""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron.sft.model.moe.expert_bias import expert_bias_rows
from megatron.sft.model.moe.experts import GROUPED_WEIGHTS, ExpertsImplError, grouped_linear


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


def _group(linears: list, split_dim: int) -> torch.nn.Parameter:
    """The experts' weights of one projection as one ``[E, out, in]`` parameter; the
    per-expert parameters are removed (``weight`` ``None``), so nothing holds the weights twice.

    It is marked split over the expert-tensor-parallel ranks along ``split_dim`` whatever the
    experts' weights carry: megatron-core marks a linear's weight only when it initialises it,
    and we build with ``perform_initialization=False``; unmarked, megatron-core's gradient norm
    would count the experts on expert-TP rank 0 only (at TP2 x EP2 it read 2.15037 for
    2.15044). Their other attributes (``allreduce`` ``False`` with EP > 1: reduced over the
    expert-data-parallel ranks only) are kept."""
    first = linears[0].weight
    grouped = torch.nn.Parameter(torch.stack([lin.weight.detach() for lin in linears]),
                                 requires_grad=first.requires_grad)
    for attr, value in vars(first).items():
        setattr(grouped, attr, value)
    grouped.tensor_model_parallel, grouped.partition_dim = True, split_dim
    grouped.partition_stride = getattr(first, "partition_stride", 1)
    for lin in linears:
        lin.register_parameter("weight", None)
    return grouped


def _checkpoint_names(module, destination, prefix, local_metadata) -> None:
    """``state_dict`` post-hook: the 3-D parameters as the checkpoint has them, one
    ``local_experts.{e}.linear_fc1.weight`` row each, in ``SequentialMLP``'s key order (each
    expert linear's weight before its bias and extra state). The module's entries are the last
    ones of ``destination`` when this runs, so they are taken out and put back in that order."""
    tail = {k: destination.pop(k) for k in [k for k in destination if k.startswith(prefix)]}
    rows = {}
    for linear, name in GROUPED_WEIGHTS.items():
        grouped = tail.pop(prefix + name)
        rows.update({f"{prefix}local_experts.{e}.{linear}.": _row(grouped, e)
                     for e in range(grouped.shape[0])})
    for key, value in tail.items():
        parts = key[len(prefix):].split(".")  # local_experts.{e}.{linear}.<bias, lora, ...>
        row = prefix + ".".join(parts[:3]) + "." if parts[0] == "local_experts" else None
        if row in rows:
            destination[row + "weight"] = rows.pop(row)
        destination[key] = value
    for row, value in rows.items():  # an expert linear with nothing else to save
        destination[row + "weight"] = value


def _row(grouped: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e``'s weight. Under Megatron-FSDP the parameter is a sharded ``DTensor``, whose
    indexing is a collective, and only the rank-file writer asks for the state dict there
    (``training.fsdp.gathered_state_dicts``, which gathers the whole parameter itself and puts
    its rows under these names): the name is what is needed, so the shard stands in."""
    from torch.distributed.tensor import DTensor

    return grouped if isinstance(grouped, DTensor) else grouped[e]


class GroupedMMExperts(SequentialMLP):
    """``SequentialMLP``'s experts as one 3-D parameter per projection, two grouped GEMMs
    (module docstring of :mod:`megatron.sft.model.moe.experts`)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        cfg = self.config
        unsupported = [name for name, on in (
            ("fp8", cfg.fp8), ("fp4", cfg.fp4),
            ("moe_latent_size", cfg.moe_latent_size)) if on]
        if unsupported:
            raise ExpertsImplError(f"--moe-experts-impl grouped_mm does not support "
                                   f"{', '.join(unsupported)}; use --moe-experts-impl sequential")
        for (linear, name), dim in zip(GROUPED_WEIGHTS.items(), (1, 2)):  # column, row
            self.register_parameter(name, _group([getattr(e, linear) for e in self.local_experts],
                                                 dim))
        self.register_state_dict_post_hook(_checkpoint_names)

    def expert_weight(self, expert: int, linear: str) -> torch.Tensor:
        """Local expert ``expert``'s ``linear`` weight (``[out, in]``, a view of the 3-D
        parameter, with its attributes), for code that looks at one expert's weight (LoRA)."""
        grouped = getattr(self, GROUPED_WEIGHTS[linear])
        view = grouped[expert]
        for attr, value in vars(grouped).items():
            setattr(view, attr, value - 1 if attr == "partition_dim" else value)
        return view

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for linear, name in GROUPED_WEIGHTS.items():
            grouped = getattr(self, name)
            for e in range(grouped.shape[0]):
                key = f"{prefix}local_experts.{e}.{linear}.weight"
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                value = state_dict.pop(key)  # so the weight-less expert linear never sees it
                if tuple(value.shape) != tuple(grouped.shape[1:]):
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                      f"{tuple(value.shape)} from checkpoint, the shape in "
                                      f"current model is {tuple(grouped.shape[1:])}.")
                    continue
                with torch.no_grad():
                    grouped[e].copy_(value)
        own = {prefix + name for name in GROUPED_WEIGHTS.values()}
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        missing_keys[before:] = [k for k in missing_keys[before:] if k not in own]

    def _run_linears_pre_hooks(self) -> None:
        """The expert linears (which keep the biases) are read, not called, so run their
        forward pre-hooks here: megatron-core's DDP waits there for its overlapped parameter
        all-gather (``--use-distributed-optimizer`` with DP > 1); without it this forward could
        read biases the all-gather has not written yet. (The 3-D weights are this module's
        own parameters: its own pre-hook, run by the call, waits for them.)"""
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
        offs = torch.cumsum(tokens_per_expert.to(x.device), 0).to(torch.int32)
        h = self._with_lora("linear_fc1", grouped_linear(x, self.linear_fc1_weight, offs), x, offs)
        if (b1 := expert_bias_rows(self, "linear_fc1", tokens_per_expert)) is not None:
            h = h + b1  # expert biases (GPT-OSS): as megatron-core's expert MLP adds them
        h = _glu(self.config, h)
        h = (h * probs.unsqueeze(-1)).to(h.dtype)
        out = self._with_lora("linear_fc2", grouped_linear(h, self.linear_fc2_weight, offs), h,
                              offs)
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
