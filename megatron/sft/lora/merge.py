"""A LoRA run read as the model it trains: its base with the adapters merged, per TP shard.

Merging needs no communication: for both split kinds the local ``B_rank @ A_rank`` has the
local weight's shape (column: ``[out/tp, r] @ [r, in]``; row: ``[out, r] @ [r, in/tp]``), so
``W_rank += (alpha/r) B_rank A_rank`` and then the usual export or reshard.
:func:`open_checkpoint` is how tools open any checkpoint: a LoRA run gets a
:class:`LoRARunReader`, which ``bridge.export`` and ``bridge.reshard`` read like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron.sft.bridge.checkpoint_io import CheckpointError, iteration_dir, load_rank_state
from megatron.sft.bridge.reader import CheckpointReader
from megatron.sft.lora.run_format import LORA_FILE, LoRACheckpointInfo, check_base, read_lora_info


def merge_adapters(base_state: dict[str, torch.Tensor], adapter_state: dict[str, torch.Tensor],
                   scale: float) -> dict[str, torch.Tensor]:
    """One rank's chunk state dict with ``W += scale · B @ A`` for every adapter in
    ``adapter_state`` (at least fp32 math, result in ``W``'s dtype); adapter tensors are not
    copied."""
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


class LoRARunReader(CheckpointReader):
    """A LoRA run (adapters only): reads its base (checked to be the one it was trained on)
    and merges the adapters into each stage."""

    lora: LoRACheckpointInfo

    def __init__(self, ckpt_dir: "str | Path", iteration: Optional[int] = None,
                 verify: bool = True):
        super().__init__(ckpt_dir, iteration, verify)
        info = read_lora_info(self.iter_dir)
        if info is None:
            raise CheckpointError(f"{self.iter_dir} has no {LORA_FILE}: not a LoRA run")
        self.lora = info

    def input_dirs(self) -> dict[str, Path]:
        return {**super().input_dirs(),
                f"base_checkpoint of {LORA_FILE}": Path(self.lora.base_checkpoint)}

    def base_dir(self) -> Path:
        return check_base(self.lora, self.meta, self.iter_dir)

    def stage_states(self, pp_rank: int, merge: bool = True, ep_rank: int = 0) -> list[dict]:
        """``merge=False``: the base states as they are (same names, shapes and dtypes as
        merged), for checks that need only the structure; merging costs a matmul per adapted
        weight, which on a 14B model is worth doing once, not twice."""
        base_dir, layout = self.base_dir(), self.layout
        out = []
        for tp, adapters in enumerate(self.rank_states(pp_rank, ep_rank)):
            base = load_rank_state(base_dir, layout, tp, pp_rank, ep_rank, verify=self.verify)
            state = dict(base)
            for chunk in range(layout.chunks if merge else 0):
                key = layout.model_key(chunk)
                state[key] = merge_adapters(base[key], adapters.get(key, {}),
                                            self.lora.settings.scale)
            out.append(state)
        return out


def open_checkpoint(ckpt_dir: "str | Path", iteration: Optional[int] = None,
                    verify: bool = True) -> CheckpointReader:
    """The reader for whatever ``ckpt_dir`` holds: a full checkpoint as it is, a LoRA run merged
    into its base. ``verify``: check files against their checksums before reading them."""
    if read_lora_info(iteration_dir(Path(ckpt_dir), iteration)) is not None:
        return LoRARunReader(ckpt_dir, iteration, verify)
    return CheckpointReader(ckpt_dir, iteration, verify)
