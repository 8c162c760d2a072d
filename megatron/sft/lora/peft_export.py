"""A LoRA run's adapters as an HF PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``), for ``peft.PeftModel.from_pretrained(base, OUT)``.

The adapters are un-split into the layout-free PEFT form (:mod:`megatron.sft.lora.split`): a
column adapter's ``B`` is merged like its base weight (fused QKV rows -> q/k/v, ``[gate; up]``
per rank -> gate/up) and its replicated ``A`` is shared by the parts; a row adapter's ``A`` is
concatenated along its input. HF module names come from the architecture's weight rules.
On a Mixture-of-Experts model the MLP adapters are peft ``target_parameters`` (why:
:func:`megatron.sft.lora.split.peft_targets`) and the routed experts' are in peft's fused form
(:mod:`megatron.sft.lora.peft_experts`); what that form cannot express is refused before
anything is written, pointing to the merged export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from megatron.sft.bridge.checkpoint_io import CheckpointError, check_output_dir, write_staged
from megatron.sft.bridge.reader import CheckpointReader
from megatron.sft.lora.run_format import LORA_FILE, LoRACheckpointInfo, read_lora_info
from megatron.sft.lora.peft_experts import ExpertsNotExpressible, fused_expert_tensors
from megatron.sft.lora.split import adapter_to_hf, layer_target_names, peft_targets, target_names
from megatron.sft.runtime.locks import exclusive_output
from megatron.sft.runtime.path_overlap import check_output_separate

#: ``{(global layer, target, global expert or None): {hf_module: (lora_A, lora_B)}}``; a routed
#: expert's modules carry its index (``mlp.experts.5.gate_proj``)
PeftAdapters = dict[tuple[int, str, Optional[int]],
                    dict[str, tuple[torch.Tensor, torch.Tensor]]]


def _adapter(run: CheckpointReader, states: list, key: str, prefix: str, where: str):
    try:
        return [s[key][prefix + "A"] for s in states], [s[key][prefix + "B"] for s in states]
    except KeyError:
        raise CheckpointError(f"{run.iter_dir / where}: no adapter {prefix}A/B in {key}; the "
                              "checkpoint is incomplete") from None


def read_run_adapters(run: CheckpointReader, info: LoRACheckpointInfo) -> PeftAdapters:
    """A LoRA run's adapters in the layout-free PEFT form (adapters are small, so all of them at
    once): every layer's targets from expert-parallel rank 0's files (the same in all), and
    each routed expert's from the files of the rank that holds it."""
    layout, shape = run.layout, run.shape
    out: PeftAdapters = {}
    expert_targets = info.settings.expert_targets if shape.moe is not None else ()
    local_experts = shape.moe.num_experts // layout.ep if expert_targets else 0
    for pp_rank in range(layout.pp):
        for ep_rank in range(layout.ep if expert_targets else 1):
            states = run.rank_states(pp_rank, ep_rank)
            where = layout.rank_dir_name(0, pp_rank, ep_rank)
            for chunk in range(layout.chunks):
                key = layout.model_key(chunk)
                for local, layer in enumerate(layout.chunk_layers(shape, pp_rank, chunk)):
                    for target in info.settings.targets if ep_rank == 0 else ():
                        tn = layer_target_names(run.spec, shape, layer, target)
                        if tn is None:  # a MoE layer's MLP without a shared expert
                            continue
                        a, b = _adapter(run, states, key, tn.adapter_prefix(local), where)
                        out[(layer, target, None)] = adapter_to_hf(tn, a, b, shape)
                    if not shape.flag("moe_layer", layer):
                        continue
                    for target in expert_targets:
                        tn = target_names(run.spec, target, routed_expert=True)
                        for e in range(local_experts):
                            index = ep_rank * local_experts + e
                            a, b = _adapter(run, states, key, tn.adapter_prefix(local, e), where)
                            out[(layer, target, index)] = adapter_to_hf(tn.for_expert(index),
                                                                        a, b, shape)
    return out


def peft_tensors(run: CheckpointReader, adapters: PeftAdapters
                 ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(tensors, routed experts' target_parameters)`` of the adapter file: each module's
    ``lora_A``/``lora_B`` under its HF name, the routed experts' in peft's fused form
    (:mod:`megatron.sft.lora.peft_experts`); refuses what that form cannot express."""
    tensors: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for (layer, target, expert), modules in adapters.items():
        if expert is None:
            names = layer_target_names(run.spec, run.shape, layer, target)
            for module, (ha, hb) in modules.items():
                tensors[names.peft_name(layer, module, "A")] = ha
                tensors[names.peft_name(layer, module, "B")] = hb
            continue
        generic = target_names(run.spec, target, routed_expert=True)
        per_expert = experts.setdefault(layer, {}).setdefault(expert, {})
        for module, concrete in zip(generic.modules, generic.for_expert(expert).modules):
            per_expert[f"{generic.layer_prefix}{module}.weight"] = modules[concrete]
    parameters: set[str] = set()
    for layer, by_expert in sorted(experts.items()):
        try:
            fused, params = fused_expert_tensors(run.spec.fused_experts, layer, by_expert)
        except ExpertsNotExpressible as e:
            raise CheckpointError(
                f"{run.iter_dir}: the routed experts' adapters of {run.spec.hf_architecture} "
                f"cannot be written as a PEFT adapter ({e}); export the merged model instead "
                "(scripts/checkpoints/merge_and_export.sh), which holds them") from None
        tensors.update(fused)
        parameters.update(params)
    return tensors, sorted(parameters)


def export_lora_adapter(ckpt_dir: "str | Path", out_dir: "str | Path",
                        hf_ref_dir: "str | Path | None" = None, iteration: Optional[int] = None,
                        force: bool = False, dtype: Optional[torch.dtype] = None,
                        verify: bool = True) -> Path:
    """A LoRA run's adapters -> ``out_dir`` with ``adapter_config.json`` and
    ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained(hf_model, out_dir)``
    loads (HF module names as the architecture's table has them: ``q_proj``, ..., ``down_proj``
    for the llama family)."""
    from safetensors.torch import save_file

    run = CheckpointReader(ckpt_dir, iteration, verify)
    info = read_lora_info(run.iter_dir)
    if info is None:
        raise CheckpointError(f"{run.iter_dir} has no {LORA_FILE}: not a LoRA run (train with "
                              "--lora-rank R); export full checkpoints with merge_and_export.sh")
    out_dir = Path(out_dir)
    check_output_separate(out_dir, "OUT_DIR", {"RUN_DIR": ckpt_dir, "HF_REF_DIR": hf_ref_dir})
    tensors, expert_parameters = peft_tensors(run, read_run_adapters(run, info))
    tensors = {k: (t.to(dtype) if dtype is not None else t).contiguous().clone()
               for k, t in tensors.items()}
    alpha = info.settings.alpha
    modules, parameters = peft_targets(run.spec, info.settings.targets, run.shape)
    parameters = parameters + expert_parameters
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": info.settings.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        # peft's ParamWrapper (parameter targets) refuses dropout; it acts only in training,
        # so the adapter computes the same function without it
        "lora_dropout": 0.0 if parameters else info.settings.dropout,
        "target_modules": modules,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
        "init_lora_weights": True, "modules_to_save": None,
        **({"target_parameters": parameters} if parameters else {}),
        "base_model_name_or_path": str(hf_ref_dir) if hf_ref_dir is not None else None,
    }

    def write(staging: Path) -> None:
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    with exclusive_output(out_dir, "LoRA adapter export"):
        check_output_dir(out_dir, force)
        write_staged(out_dir, write)
    return out_dir
