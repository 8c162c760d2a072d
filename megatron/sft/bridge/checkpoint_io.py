"""Megatron-LM checkpoint directories: layout, metadata, atomic publication.

::

    CKPT_DIR/
      latest_checkpointed_iteration.txt      written last: its presence means "complete"
      iter_0000001/
        sft_metadata.json                    architecture, HF config, layout, dtype, producer
        checksums.json                       SHA-256 of every file below (``integrity``)
        mp_rank_00_000/model_optim_rng.pt    {"model" | "model0".., "iteration", ...}

Every writer builds an iteration in ``iter_NNNNNNN.partial`` and renames it into place before
the tracker file is updated, so an interrupted save never looks like a finished checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.utils.serialization

from megatron.sft.bridge.integrity import FileDigest, HashingFile, verify_file
from megatron.sft.bridge.transforms import own_storage
from megatron.sft.runtime.disk import disk_full_guard
from megatron.sft.runtime.layout import ParallelLayout, iteration_dir_name
from megatron.sft.runtime.locks import partial_name

R = TypeVar("R")

TRACKER_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = "sft_metadata.json"
RANK_FILE = "model_optim_rng.pt"
FORMAT = "megatron-sft/1"
CHECKPOINT_VERSION = 3.0


class CheckpointError(ValueError):
    pass


@dataclasses.dataclass
class CheckpointMetadata:
    """What is needed to rebuild and export the model without repeating model flags.

    On disk the layout is stored flat under Megatron-LM's argument names
    (``tensor_model_parallel_size``, ..., see ``ParallelLayout.to_metadata``).
    """

    architecture: str
    hf_config: dict[str, Any]
    #: the layout of the rank files (context parallelism never changes them)
    layout: ParallelLayout
    make_vocab_size_divisible_by: int
    padded_vocab_size: int
    params_dtype: str
    format: str = FORMAT
    #: what wrote this iteration: ``convert``, ``reshard`` or ``training`` (``None``: written
    #: before this was recorded). A training run never replaces or prunes an iteration it did
    #: not write.
    producer: Optional[str] = None
    #: the HF model directory a run loaded directly (``--load HF_DIR``): its path and
    #: fingerprint (``hf_source.hf_fingerprint``), kept by every later save of the run
    hf_source: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        self.layout = self.layout.for_checkpoint()

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layout"
             and not (f.name == "hf_source" and self.hf_source is None)}
        d.update(self.layout.to_metadata())
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CheckpointMetadata":
        if d.get("format") != FORMAT:
            raise CheckpointError(f"unknown checkpoint metadata format {d.get('format')!r}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"layout"}
        return cls(layout=ParallelLayout.from_metadata(d),
                   **{k: v for k, v in d.items() if k in fields})


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    value = getattr(torch, aliases.get(name, name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (use fp32, bf16 or fp16)")
    return value


def read_latest_iteration(ckpt_dir: Path) -> int:
    tracker = Path(ckpt_dir) / TRACKER_FILE
    if not tracker.exists():
        raise CheckpointError(
            f"{ckpt_dir} has no {TRACKER_FILE}: not a Megatron checkpoint directory, or a save "
            "that never completed"
        )
    text = tracker.read_text().strip()
    if text == "release":  # the callers differ in flags: name the fix for each
        raise CheckpointError(
            f"{tracker} says 'release' (Megatron-LM's marker for a release/ folder), not an "
            f"iteration: export and reshard take --iteration N; for training (which has no such "
            f"flag) write the iteration number into {tracker} (a release/ folder: rename it "
            f"to iter_0000001 and write 1)")
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number") from None


def iteration_dir(ckpt_dir: Path, iteration: Optional[int] = None) -> Path:
    ckpt_dir = Path(ckpt_dir)
    if iteration is None:
        iteration = read_latest_iteration(ckpt_dir)
    path = ckpt_dir / iteration_dir_name(iteration)
    if not path.is_dir():
        have = sorted(p.name for p in ckpt_dir.glob("iter_*") if p.is_dir())
        raise CheckpointError(f"{path} does not exist (available: {have or 'none'})")
    return path


def read_metadata(iter_dir: Path) -> CheckpointMetadata:
    path = Path(iter_dir) / METADATA_FILE
    if not path.exists():
        raise CheckpointError(
            f"{path} is missing: this checkpoint was not written by Megatron-SFT, so its model "
            "cannot be rebuilt automatically; convert from HF with convert_hf_to_megatron.sh"
        )
    return CheckpointMetadata.from_dict(read_json(path, "checkpoint metadata"))


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; a truncated or hand-broken file is an error naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} ({what}) is not valid JSON: {e}; the file is truncated "
                              "or was edited by hand. Restore it from a copy") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} ({what}) holds a {type(data).__name__}, not a JSON "
                              "object; restore it from a copy")
    return data


def rank_file(iter_dir: Path, layout: ParallelLayout, tp_rank: int, pp_rank: int,
              ep_rank: int = 0) -> Path:
    return Path(iter_dir) / layout.rank_dir_name(tp_rank, pp_rank, ep_rank) / RANK_FILE


def load_rank_state(iter_dir: Path, layout: ParallelLayout, tp_rank: int, pp_rank: int,
                    ep_rank: int = 0, mmap: bool = True, verify: bool = True) -> dict[str, Any]:
    """``weights_only`` load; ``mmap`` keeps untouched tensors on disk. ``verify`` first checks
    the file against the iteration's ``checksums.json`` (when it has one)."""
    path = rank_file(iter_dir, layout, tp_rank, pp_rank, ep_rank)
    if not path.exists():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    if verify:
        verify_file(iter_dir, path)
    return load_file_state(path, mmap)


def load_file_state(path: Path, mmap: bool = True) -> dict[str, Any]:
    """``torch.load`` whose failures on a damaged file are one line naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} cannot be read ({first}): the file is truncated or "
                              "corrupt. Restore it, or load an earlier iteration") from None


def written_by_training(iter_dir: Path) -> bool:
    """Whether a training run wrote this iteration (it may prune or replace it), as opposed to
    a converter or reshard (the base a run started from: never touched by training). Iterations
    from before ``producer`` was recorded tell by their optimizer state."""
    meta = read_metadata(iter_dir)
    if meta.producer is not None:
        return meta.producer == "training"
    first = next(iter(sorted(Path(iter_dir).glob(f"mp_rank_*/{RANK_FILE}"))), None)
    return first is not None and "optimizer" in load_file_state(first, mmap=True)


def compact_views(state: Any) -> Any:
    """Tensors that view a larger storage, on storages of their own: ``torch.save`` writes whole
    storages, so a TP shard that is a slice of the full tensor would otherwise carry all of it
    to disk. A contiguous slice (a row block: column-parallel shards, vocabulary shards) gets a
    storage over its own bytes without a copy (``transforms.own_storage``); any other view is cloned. The
    file is the same either way."""
    if isinstance(state, dict):
        return {k: compact_views(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        if state.untyped_storage().nbytes() != state.numel() * state.element_size():
            return own_storage(state)
    return state


def state_nbytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: about what ``torch.save`` writes."""
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    return 0


def save_rank_state(iter_dir: Path, layout: ParallelLayout, tp_rank: int, pp_rank: int,
                    state: dict[str, Any], ep_rank: int = 0) -> FileDigest:
    """Write one rank file; returns its digest for ``checksums.json`` (computed as it streams
    out). A write that fails for lack of space is a ``DiskFullError`` naming the directory."""
    return save_file_state(iter_dir, rank_file(iter_dir, layout, tp_rank, pp_rank, ep_rank),
                           state)


def save_file_state(iter_dir: Path, path: Path, state: dict[str, Any]) -> FileDigest:
    """:func:`save_rank_state` for any file of the iteration ``iter_dir`` (an optimizer shard
    beside a rank file)."""
    state = compact_views(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    # Zip CRCs cost ~5x the write itself and torch.load never checks them; the SHA-256 of the
    # whole file, taken as it is written, is what integrity relies on.
    crc_config = torch.utils.serialization.config.save
    previous = crc_config.compute_crc32
    crc_config.compute_crc32 = False
    try:
        with disk_full_guard(Path(iter_dir).parent, state_nbytes(state), f"{path.name} of "
                             f"{Path(iter_dir).name}"):
            try:
                with open(tmp, "wb") as f:
                    out = HashingFile(f)
                    torch.save(state, out)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    finally:
        crc_config.compute_crc32 = previous
    os.replace(tmp, path)
    return FileDigest(path.relative_to(iter_dir).as_posix(), out.bytes, out.hexdigest())


def write_metadata(iter_dir: Path, meta: CheckpointMetadata) -> None:
    path = Path(iter_dir) / METADATA_FILE
    path.write_text(json.dumps(meta.to_dict(), indent=2, sort_keys=True) + "\n")


def partial_iteration_dir(ckpt_dir: Path, iteration: int) -> Path:
    return Path(ckpt_dir) / (iteration_dir_name(iteration) + ".partial")


def publish_iteration(ckpt_dir: Path, iteration: int) -> Path:
    """Rename the finished ``.partial`` directory into place, then update the tracker."""
    ckpt_dir = Path(ckpt_dir)
    partial = partial_iteration_dir(ckpt_dir, iteration)
    final = ckpt_dir / iteration_dir_name(iteration)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    tracker_tmp = ckpt_dir / (TRACKER_FILE + ".tmp")
    tracker_tmp.write_text(f"{iteration}\n")
    os.replace(tracker_tmp, ckpt_dir / TRACKER_FILE)
    return final


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse to overwrite anything unless asked, before any work starts."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not force:
            raise FileExistsError(
                f"output directory {out_dir} already exists and is not empty; "
                "choose another path or pass --force to replace it"
            )


def publish_directory(tmp_dir: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the fully written ``tmp_dir`` (same filesystem, so a rename)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        trash = out_dir.with_name(out_dir.name + ".old")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(out_dir, trash)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(trash)
    else:
        os.replace(tmp_dir, out_dir)


def staging_dir(out_dir: Path) -> Path:
    """A sibling of ``out_dir`` on the same filesystem whose name never looks complete and says
    who writes it (``OUT.partial-HOST-PID``), so a later run can remove it if that one died."""
    out_dir = Path(out_dir)
    return out_dir.with_name(partial_name(out_dir.name))


def write_staged(out_dir: Path, write: Callable[[Path], R]) -> R:
    """Every tool that writes a directory does it here: ``write(staging)`` fills a fresh
    :func:`staging_dir` next to ``out_dir``, which is then renamed to ``out_dir``; on any error
    (or Ctrl-C) the staging directory is removed, so nothing half-written is ever at
    ``out_dir``. Returns what ``write`` returns."""
    staging = staging_dir(out_dir)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        result = write(staging)
        publish_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result
