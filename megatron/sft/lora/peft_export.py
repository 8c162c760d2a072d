"""A LoRA run's adapters as an HF PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``), for ``peft.PeftModel.from_pretrained(base, OUT)``.

The adapters are un-split into the layout-free PEFT form (:mod:`megatron.sft.lora.split`): a
column adapter's ``B`` is merged like its base weight (fused QKV rows -> q/k/v, ``[gate; up]``
per rank -> gate/up) and its replicated ``A`` is shared by the parts; a row adapter's ``A`` is
concatenated along its input. HF module names come from the architecture's weight rules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from megatron.sft.bridge.checkpoint_io import CheckpointError, check_output_dir, write_staged
from megatron.sft.bridge.reader import CheckpointReader
from megatron.sft.lora.run_format import LORA_FILE, LoRACheckpointInfo, read_lora_info
from megatron.sft.lora.split import adapter_to_hf, layer_target_names, peft_targets
from megatron.sft.runtime.locks import exclusive_output
from megatron.sft.runtime.path_overlap import check_output_separate

#: ``{(global layer, target): {hf_module: (lora_A, lora_B)}}``
PeftAdapters = dict[tuple[int, str], dict[str, tuple[torch.Tensor, torch.Tensor]]]


def read_run_adapters(run: CheckpointReader, info: LoRACheckpointInfo) -> PeftAdapters:
    """A LoRA run's adapters in the layout-free PEFT form (adapters are small, so all of them at
    once)."""
    layout, shape = run.layout, run.shape
    out: PeftAdapters = {}
    for pp_rank in range(layout.pp):
        states = run.rank_states(pp_rank)
        for chunk in range(layout.chunks):
            key = layout.model_key(chunk)
            for local, layer in enumerate(layout.chunk_layers(shape, pp_rank, chunk)):
                for target in info.settings.targets:
                    tn = layer_target_names(run.spec, shape, layer, target)
                    if tn is None:  # a MoE layer's MLP without a shared expert
                        continue
                    prefix = tn.adapter_prefix(local)
                    try:
                        a = [s[key][prefix + "A"] for s in states]
                        b = [s[key][prefix + "B"] for s in states]
                    except KeyError:
                        raise CheckpointError(
                            f"{run.iter_dir / layout.rank_dir_name(0, pp_rank)}: no adapter "
                            f"{prefix}A/B in {key}; the checkpoint is incomplete") from None
                    out[(layer, target)] = adapter_to_hf(tn, a, b, shape)
    return out


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
    tensors: dict[str, torch.Tensor] = {}
    for (layer, target), modules in read_run_adapters(run, info).items():
        names = layer_target_names(run.spec, run.shape, layer, target)
        for module, (ha, hb) in modules.items():
            for part, t in (("A", ha), ("B", hb)):
                t = t.to(dtype) if dtype is not None else t
                tensors[names.peft_name(layer, module, part)] = t.contiguous().clone()
    alpha = info.settings.alpha
    modules, parameters = peft_targets(run.spec, info.settings.targets, run.shape)
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
