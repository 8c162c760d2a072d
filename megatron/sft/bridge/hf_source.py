"""An HF model directory used directly as ``--load``: how it is told apart from a Megatron
checkpoint, its cheap fingerprint, and the checkpoint metadata the converter would write for it.

A directory is an HF model when it has ``config.json`` and no
``latest_checkpointed_iteration.txt`` (a Megatron checkpoint always has the tracker; an HF
directory never does). The metadata is built by the converter's own steps (architecture table,
coverage check, dtype choice, vocabulary padding), so a model built from it is the model built
from ``convert_hf_to_megatron.sh``'s output at the same layout.

The fingerprint names the weights without reading them: the SHA-256 of ``config.json`` and of
the safetensors index (when there is one), and each safetensors file's size and header (names,
dtypes, shapes, offsets). Example: ``{"path": "/m/qwen", "fingerprint": "3f1c…", "files":
{"config.json": [612, "9a…"], "model.safetensors": [988097824, "41…"]}}``.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from megatron.sft.bridge.architectures import shape_of
from megatron.sft.bridge.checkpoint_io import (
    TRACKER_FILE,
    CheckpointMetadata,
    dtype_name,
)
from megatron.sft.bridge.convert import _checkpoint_dtype, load_hf_config, open_source
from megatron.sft.bridge.transforms import padded_vocab_size
from megatron.sft.runtime.layout import ParallelLayout

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"


def is_hf_model_dir(path: "str | Path") -> bool:
    """``True`` for a directory with ``config.json`` and no Megatron tracker file.

    >>> is_hf_model_dir("/nonexistent")
    False
    """
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file() and not (p / TRACKER_FILE).exists()


def describe_load_problem(path: "str | Path") -> Optional[str]:
    """Why ``--load PATH`` can be neither an HF model nor a Megatron checkpoint (``None`` when
    it is one of them): the message names what is missing and the fix."""
    p = Path(path)
    if not p.exists():
        return (f"--load {path} does not exist: give a Megatron checkpoint directory (with "
                f"{TRACKER_FILE}) or a HuggingFace model directory (with {CONFIG_FILE} and "
                "*.safetensors)")
    if not p.is_dir():
        return f"--load {path} is a file, not a directory: give the directory that holds it"
    if (p / TRACKER_FILE).exists() or (p / CONFIG_FILE).is_file():
        return None
    return (f"--load {path} holds neither a Megatron checkpoint ({TRACKER_FILE}) nor a "
            f"HuggingFace model ({CONFIG_FILE} + *.safetensors): point --load at a model "
            "downloaded with scripts/checkpoints/download_hf_models.py, a converted checkpoint "
            "or a previous run's --save")


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read(8)
        (length,) = struct.unpack("<Q", raw) if len(raw) == 8 else (0,)
        return raw + f.read(min(length, 100 * 1024 * 1024))


def _weight_files(hf_dir: Path) -> list[Path]:
    return sorted(hf_dir.glob("*.safetensors"))


def hf_fingerprint(hf_dir: "str | Path") -> dict[str, Any]:
    """``{"path", "fingerprint", "files"}``: see the module docstring; reads only the config,
    the index and each weight file's header (kilobytes, whatever the model's size)."""
    hf_dir = Path(hf_dir).resolve()
    files: dict[str, list] = {}
    for name in (CONFIG_FILE, INDEX_FILE):
        path = hf_dir / name
        if path.is_file():
            data = path.read_bytes()
            files[name] = [len(data), hashlib.sha256(data).hexdigest()]
    for path in _weight_files(hf_dir):
        files[path.name] = [path.stat().st_size,
                            hashlib.sha256(_safetensors_header(path)).hexdigest()]
    whole = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:16]
    return {"path": str(hf_dir), "fingerprint": whole, "files": files}


def check_same_source(recorded: dict[str, Any]) -> Optional[str]:
    """``None`` when the HF directory a checkpoint recorded is still there and unchanged, else
    a sentence saying what changed."""
    path = Path(recorded["path"])
    if not is_hf_model_dir(path):
        return f"{path} is no longer an HF model directory"
    now = hf_fingerprint(path)
    if now["fingerprint"] == recorded["fingerprint"]:
        return None
    changed = sorted(set(now["files"]) ^ set(recorded["files"])
                     | {n for n in now["files"] if now["files"][n] != recorded["files"].get(n)})
    return f"{path} changed since it was recorded ({', '.join(changed[:6])})"


def hf_checkpoint_metadata(hf_dir: "str | Path", layout: ParallelLayout, *,
                           make_vocab_size_divisible_by: int = 128,
                           params_dtype: Optional[torch.dtype] = None,
                           log: Callable[[str], None] = print
                           ) -> tuple[CheckpointMetadata, Any]:
    """``(metadata, source)``: what ``convert_hf_to_megatron`` with these options would write
    into ``sft_metadata.json`` (plus ``hf_source``), and the opened, coverage-checked tensor
    source to read the weights from (``rank_shard.rank_state``)."""
    hf_dir = Path(hf_dir)
    config = load_hf_config(hf_dir)
    spec, shape = shape_of(config)
    layout.validate(shape)
    source, expected = open_source(hf_dir, spec, shape, params_dtype)
    dtype = params_dtype or _checkpoint_dtype(source, list(expected), log)
    meta = CheckpointMetadata(
        architecture=spec.hf_architecture, hf_config=config, layout=layout,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        padded_vocab_size=padded_vocab_size(shape.vocab_size, make_vocab_size_divisible_by,
                                            layout.tp),
        params_dtype=dtype_name(dtype), producer="hf", hf_source=hf_fingerprint(hf_dir))
    return meta, source
