"""The LoRA run format: which base a run's adapters adapt, and the one check that a base is
that base.

A LoRA run's ``iter_N/`` holds only the adapter tensors (``…linear_qkv.lora.A`` / ``.lora.B``,
per TP x PP rank like any weight), the optimizer state of those, and ``lora.json`` naming the
base checkpoint (absolute path + iteration + a fingerprint) the adapters were trained on::

    {"settings": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["linear_qkv", …]},
     "base_checkpoint": "/ckpts/qwen_TP2PP1", "base_iteration": 0, "base_fingerprint": "…"}

Reading such a run as a model (merged) is :mod:`megatron.sft.lora.merge`; its PEFT export
:mod:`megatron.sft.lora.peft_export`; resharding it :mod:`megatron.sft.lora.reshard`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch

from megatron.sft.bridge.checkpoint_io import (
    METADATA_FILE,
    CheckpointError,
    CheckpointMetadata,
    iteration_dir,
    read_metadata,
)
from megatron.sft.bridge.reader import CheckpointReader
from megatron.sft.lora.settings import LoRASettings
from megatron.sft.runtime.layout import ParallelLayout

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


def model_differences(a: CheckpointMetadata, b: CheckpointMetadata) -> list[str]:
    """How two checkpoints' models differ, if they do: ``["config.json hidden_size: 64 vs
    96"]`` (layout and dtype are not the model)."""
    diffs = ([f"architecture {a.architecture} vs {b.architecture}"]
             if a.architecture != b.architecture else [])
    diffs += [f"config.json {k}: {a.hf_config.get(k)!r} vs {b.hf_config.get(k)!r}"
              for k in sorted(set(a.hf_config) | set(b.hf_config))
              if a.hf_config.get(k) != b.hf_config.get(k)]
    return diffs


def check_base(info: LoRACheckpointInfo, run_meta: CheckpointMetadata, run_dir: Path,
               candidate: Optional[CheckpointReader] = None,
               target: Optional[ParallelLayout] = None) -> Path:
    """The base iteration directory the adapters in ``run_dir`` load onto; raises
    ``CheckpointError`` naming the fix.

    Without ``candidate``: the base ``lora.json`` records, after checking it is still there and
    unchanged (same model, layout and vocabulary padding as the run, same fingerprint). With a
    ``candidate`` (``--lora-base``: a checkpoint the user already has at layout ``target``): that
    one, after checking the recorded base as above and then that the candidate holds the very
    same model, compared in HF form across layouts (every tensor equal in name, dtype, shape and
    value); the error names the first difference.
    """
    try:
        base_dir = info.base_iter_dir
    except CheckpointError as e:
        raise CheckpointError(
            f"{run_dir} holds LoRA adapters for base checkpoint {info.base_checkpoint} iteration "
            f"{info.base_iteration}, which is not readable ({e}); restore that checkpoint or "
            f"edit base_checkpoint in {Path(run_dir) / LORA_FILE}") from None
    base_meta = read_metadata(base_dir)
    diffs = [f for f in ("architecture", "hf_config", "layout", "padded_vocab_size")
             if getattr(base_meta, f) != getattr(run_meta, f)]
    if diffs or base_fingerprint(base_dir) != info.base_fingerprint:
        raise CheckpointError(
            f"{run_dir}: its LoRA adapters were trained on {base_dir}, but that checkpoint has "
            f"changed ({'differs in ' + ', '.join(diffs) if diffs else 'other rank files'}); "
            "adapters only make sense on the exact base they were trained on")
    if candidate is None:
        return base_dir
    _check_same_base(candidate, CheckpointReader(base_dir.parent, info.base_iteration),
                     target or candidate.layout)
    return candidate.iter_dir


def _check_same_base(candidate: CheckpointReader, run_base: CheckpointReader,
                     target: ParallelLayout) -> None:
    where = f"--lora-base {candidate.iter_dir.parent}"
    fix = ("leave --lora-base out to reshard the run's own base into OUT/base, or pass a "
           f"checkpoint of that same model at {target.describe()}")
    if read_lora_info(candidate.iter_dir) is not None:
        raise CheckpointError(f"{where} is itself a LoRA run (adapters only); {fix}")
    if candidate.layout != target:
        raise CheckpointError(f"{where} is at {candidate.layout.describe()}, but the target layout "
                              f"is {target.describe()}; {fix}")
    diffs = model_differences(candidate.meta, run_base.meta)
    if diffs:
        raise CheckpointError(f"{where} is a different model than the run's base "
                              f"{run_base.iter_dir} ({'; '.join(diffs[:4])}); {fix}")
    reference = dict(run_base.tensors())  # mmap'd views
    for name, t in candidate.tensors():
        ref = reference.pop(name, None)
        if ref is None:
            problem = "is not in the run's base"
        elif (ref.dtype, ref.shape) != (t.dtype, t.shape):
            problem = (f"is {str(t.dtype)[6:]} {tuple(t.shape)}, the run's base's is "
                       f"{str(ref.dtype)[6:]} {tuple(ref.shape)}")
        elif not torch.equal(ref, t):
            diff = (t.double() - ref.double()).abs().max().item()
            problem = f"differs from the run's base's (max abs difference {diff:.3g})"
        else:
            continue
        raise CheckpointError(f"{where} is not the base the adapters were trained on: its {name} "
                              f"{problem} ({run_base.iter_dir}); adapters only fit the exact "
                              f"base they were trained on. {fix[0].upper() + fix[1:]}")
    if reference:
        raise CheckpointError(f"{where} lacks tensors of the run's base: "
                              f"{sorted(reference)[:6]}; {fix}")
