"""LoRA run checkpoints: which base they adapt, merging adapters into it, and export as an HF
PEFT adapter.

A LoRA run's ``iter_N/`` holds only the adapter tensors (``…linear_qkv.lora.A`` / ``.lora.B``,
per TP x PP rank like any weight), the optimizer state of those, and ``lora.json`` naming the
base checkpoint (absolute path + iteration + a fingerprint) the adapters were trained on::

    {"settings": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["linear_qkv", …]},
     "base_checkpoint": "/ckpts/qwen_TP2PP1", "base_iteration": 0, "base_fingerprint": "…"}

Merging is per TP shard and needs no communication: for both split kinds the local
``B_rank @ A_rank`` has the local weight's shape (column: ``[out/tp, r] @ [r, in]``; row:
``[out, r] @ [r, in/tp]``), so ``W_rank += (alpha/r) B_rank A_rank`` and then the usual
export. The PEFT export un-splits the adapters instead: a column adapter's ``B`` is merged
like its base (fused QKV rows -> q/k/v, ``[gate; up]`` per rank -> gate/up) and its replicated
``A`` is shared by the parts; a row adapter's ``A`` is concatenated along its input (the
math: ``lora_split.py``, whose inverse reshard uses to re-split a run's adapters).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from megatron.sft.bridge.checkpoint_io import (
    METADATA_FILE,
    CheckpointError,
    CheckpointMetadata,
    check_output_dir,
    iteration_dir,
    load_rank_state,
    publish_directory,
    rank_file,
    read_metadata,
    staging_dir,
)
from megatron.sft.bridge.layout import ParallelLayout
from megatron.sft.bridge.lora_split import HF_MODULES, adapter_prefix, adapter_to_hf
from megatron.sft.bridge.model_shape import ModelShape
from megatron.sft.runtime.lora import LoRASettings

LORA_FILE = "lora.json"


@dataclasses.dataclass(frozen=True)
class LoRACheckpointInfo:
    settings: LoRASettings
    base_checkpoint: str
    base_iteration: int
    base_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.to_dict(), "base_checkpoint": self.base_checkpoint,
                "base_iteration": self.base_iteration, "base_fingerprint": self.base_fingerprint}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoRACheckpointInfo":
        return cls(LoRASettings.from_dict(d["settings"]), d["base_checkpoint"],
                   int(d["base_iteration"]), d["base_fingerprint"])

    @property
    def base_iter_dir(self) -> Path:
        return iteration_dir(Path(self.base_checkpoint), self.base_iteration)


def read_lora_info(iter_dir: Path) -> Optional[LoRACheckpointInfo]:
    """``None`` for an ordinary (full-weight) checkpoint."""
    path = Path(iter_dir) / LORA_FILE
    return LoRACheckpointInfo.from_dict(json.loads(path.read_text())) if path.exists() else None


def write_lora_info(iter_dir: Path, info: LoRACheckpointInfo) -> None:
    (Path(iter_dir) / LORA_FILE).write_text(json.dumps(info.to_dict(), indent=2) + "\n")


def base_fingerprint(base_iter_dir: Path) -> str:
    """Cheap identity of a base checkpoint: its metadata and the sizes of its rank files."""
    base_iter_dir = Path(base_iter_dir)
    h = hashlib.sha256((base_iter_dir / METADATA_FILE).read_bytes())
    for f in sorted(base_iter_dir.glob("mp_rank_*/*.pt")):
        h.update(f"{f.parent.name}/{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def check_base(info: LoRACheckpointInfo, run_meta: CheckpointMetadata, run_dir: Path) -> Path:
    """The base iteration directory the adapters in ``run_dir`` were trained on, after checking
    it is still there and still the same model; raises ``CheckpointError`` naming the fix."""
    try:
        base_dir = info.base_iter_dir
    except CheckpointError as e:
        raise CheckpointError(
            f"{run_dir} holds LoRA adapters for base checkpoint {info.base_checkpoint} iteration "
            f"{info.base_iteration}, which is not readable ({e}); restore that checkpoint or "
            f"edit base_checkpoint in {Path(run_dir) / LORA_FILE}") from None
    base_meta = read_metadata(base_dir)
    diffs = [f for f in ("architecture", "hf_config", "tensor_model_parallel_size",
                         "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
                         "padded_vocab_size")
             if getattr(base_meta, f) != getattr(run_meta, f)]
    if diffs or base_fingerprint(base_dir) != info.base_fingerprint:
        raise CheckpointError(
            f"{run_dir}: its LoRA adapters were trained on {base_dir}, but that checkpoint has "
            f"changed ({'differs in ' + ', '.join(diffs) if diffs else 'other rank files'}); "
            "adapters only make sense on the exact base they were trained on")
    return base_dir


# ------------------------------------------------------------------ merge into the base
def merge_adapters(base_state: dict[str, torch.Tensor], adapter_state: dict[str, torch.Tensor],
                   scale: float) -> dict[str, torch.Tensor]:
    """One rank's chunk state dict with ``W += scale · B @ A`` for every adapter in
    ``adapter_state`` (at least fp32 math, result in ``W``'s dtype); adapter tensors are not copied."""
    merged = dict(base_state)
    for name, a in adapter_state.items():
        if not name.endswith(".lora.A"):
            continue
        prefix = name[: -len(".lora.A")]
        weight_name, b = prefix + ".weight", adapter_state[prefix + ".lora.B"]
        if weight_name not in base_state:
            raise CheckpointError(f"adapter {name} has no base weight {weight_name}")
        w = base_state[weight_name]
        math = torch.promote_types(w.dtype, torch.float32)
        delta = scale * (b.to(math) @ a.to(math))
        if delta.shape != w.shape:
            raise CheckpointError(f"adapter {prefix} gives a {tuple(delta.shape)} update for a "
                                  f"{tuple(w.shape)} weight")
        merged[weight_name] = (w.to(math) + delta).to(w.dtype)
    return merged


def merged_stage_states(info: LoRACheckpointInfo, run_meta: CheckpointMetadata, run_dir: Path,
                        adapter_states: list[dict], pp_rank: int, merge: bool = True
                        ) -> list[dict]:
    """Base rank states of one pipeline stage with the run's adapters merged (what
    ``CheckpointReader`` exports for a LoRA run); ``merge=False`` returns the base states."""
    base_dir = check_base(info, run_meta, run_dir)
    layout = run_meta.layout
    out = []
    for tp, adapters in enumerate(adapter_states):
        base = load_rank_state(base_dir, tp, pp_rank, layout.pp)
        state = dict(base)
        for chunk in range(layout.chunks if merge else 0):
            key = layout.model_key(chunk)
            state[key] = merge_adapters(base[key], adapters.get(key, {}), info.settings.scale)
        out.append(state)
    return out


# ------------------------------------------------------------------ HF PEFT adapter
def _peft_name(layer: int, hf_module: str, part: str) -> str:
    return f"base_model.model.model.layers.{layer}.{hf_module}.lora_{part}.weight"


def read_run_adapters(iter_dir: Path, info: LoRACheckpointInfo, meta: CheckpointMetadata,
                      shape: ModelShape
                      ) -> dict[tuple[int, str], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A LoRA run's adapters in the layout-free PEFT form: ``{(global layer, target):
    {hf_module: (lora_A, lora_B)}}`` (adapters are small, so all of them at once)."""
    layout: ParallelLayout = meta.layout
    out = {}
    for pp_rank in range(layout.pp):
        states = [load_rank_state(iter_dir, tp, pp_rank, layout.pp) for tp in range(layout.tp)]
        for chunk in range(layout.chunks):
            key = layout.model_key(chunk)
            for local, layer in enumerate(layout.chunk_layers(shape, pp_rank, chunk)):
                for target in info.settings.targets:
                    prefix = adapter_prefix(local, target)
                    try:
                        a = [s[key][prefix + "A"] for s in states]
                        b = [s[key][prefix + "B"] for s in states]
                    except KeyError:
                        raise CheckpointError(
                            f"{rank_file(iter_dir, 0, pp_rank, layout.pp).parent}: no adapter "
                            f"{prefix}A/B in {key}; the checkpoint is incomplete") from None
                    out[(layer, target)] = adapter_to_hf(target, a, b, shape)
    return out


def export_lora_adapter(ckpt_dir: "str | Path", out_dir: "str | Path",
                        hf_ref_dir: "str | Path | None" = None, iteration: Optional[int] = None,
                        force: bool = False, dtype: Optional[torch.dtype] = None) -> Path:
    """A LoRA run's adapters -> ``out_dir`` with ``adapter_config.json`` and
    ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained(hf_model, out_dir)``
    loads (HF names ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``,
    ``down_proj``)."""
    from safetensors.torch import save_file

    from megatron.sft.bridge.architectures import shape_of

    iter_dir = iteration_dir(Path(ckpt_dir), iteration)
    info = read_lora_info(iter_dir)
    if info is None:
        raise CheckpointError(f"{iter_dir} has no {LORA_FILE}: not a LoRA run (train with "
                              "--lora-rank R); export full checkpoints with merge_and_export.sh")
    meta = read_metadata(iter_dir)
    _, shape = shape_of(meta.hf_config)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
    tensors: dict[str, torch.Tensor] = {}
    for (layer, _), modules in read_run_adapters(iter_dir, info, meta, shape).items():
        for module, (ha, hb) in modules.items():
            for part, t in (("A", ha), ("B", hb)):
                t = t.to(dtype) if dtype is not None else t
                tensors[_peft_name(layer, module, part)] = t.contiguous().clone()
    alpha = info.settings.alpha
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": info.settings.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": info.settings.dropout,
        "target_modules": sorted({m.split(".")[-1] for t in info.settings.targets
                                  for m in HF_MODULES[t][1]}),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
        "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": str(hf_ref_dir) if hf_ref_dir is not None else None,
    }
    staging = staging_dir(out_dir)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        publish_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
