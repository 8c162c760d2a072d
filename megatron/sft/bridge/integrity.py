"""Checkpoint integrity: a SHA-256 of every file of an iteration, recorded when it is written and
checked before it is read, so flipped or missing bytes are an error naming the file instead of
NaN weights in an exported model.

Each iteration directory holds ``checksums.json`` next to ``sft_metadata.json``::

    {"format": "megatron-sft-checksums/1",
     "files": {"mp_rank_00/model_optim_rng.pt": {"bytes": 1048576, "sha256": "9f2c..."}, ...}}

The digest of a rank file is computed while ``torch.save`` streams it out (:class:`HashingFile`,
no second read); files written by megatron-core itself (``distrib_optim.pt``) are read back once
(:func:`file_digest`). Verification reads the file once (``sha256sum`` gives the same digests)
and is remembered per process, so the model load and the optimizer load of one rank file hash it
once. Iterations written before checksums existed have no ``checksums.json``: they load as
before, unverified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Optional

CHECKSUMS_FILE = "checksums.json"
FORMAT = "megatron-sft-checksums/1"
_CHUNK = 16 * 2**20


class IntegrityError(ValueError):
    """A checkpoint file is not what was written: truncated, altered or replaced."""


@dataclasses.dataclass(frozen=True)
class FileDigest:
    #: path relative to the iteration directory, e.g. ``mp_rank_00/model_optim_rng.pt``
    name: str
    bytes: int
    sha256: str


#: writes at least this large are hashed on a second thread while the file write runs
_PARALLEL_HASH_BYTES = 1 << 20
_HASHER: Optional[ThreadPoolExecutor] = None


def _hasher() -> ThreadPoolExecutor:
    global _HASHER
    if _HASHER is None:
        _HASHER = ThreadPoolExecutor(1, thread_name_prefix="sha256")
    return _HASHER


class HashingFile:
    """A write-only file object that hashes what passes through it (``torch.save(obj, f)``).

    A large write is hashed on a helper thread while this thread writes it to the file (both
    release the GIL), and ``write`` returns only when both are done: the caller's buffer is not
    touched after it returns, the digest is the same, and the time is the longer of the two
    instead of their sum.
    """

    def __init__(self, f: BinaryIO):
        self._f = f
        self._hash = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.bytes += n
        if n < _PARALLEL_HASH_BYTES:
            self._hash.update(data)
            return self._f.write(data)
        hashed = _hasher().submit(self._hash.update, data)
        try:
            return self._f.write(data)
        finally:
            hashed.result()

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def file_digest(path: Path, name: Optional[str] = None) -> FileDigest:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return FileDigest(name or Path(path).name, n, h.hexdigest())


def write_checksums(iter_dir: Path, digests: list[FileDigest]) -> None:
    files = {d.name: {"bytes": d.bytes, "sha256": d.sha256}
             for d in sorted(digests, key=lambda d: d.name)}
    path = Path(iter_dir) / CHECKSUMS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n")
    os.replace(tmp, path)


def read_checksums(iter_dir: Path) -> Optional[dict[str, dict]]:
    """``{relative name: {"bytes", "sha256"}}``, or ``None`` for an iteration written without."""
    path = Path(iter_dir) / CHECKSUMS_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
        return dict(data["files"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise IntegrityError(f"{path} is unreadable ({e}); the checksums of this iteration "
                             "are lost: pass --no-verify to load it unchecked") from None


def unverified_notice(iter_dir: Path) -> Optional[str]:
    """The warning for an iteration that has no ``checksums.json`` (written before checksums
    existed, or the file was lost): it can only be read unverified. ``None`` when it has one."""
    iter_dir = Path(iter_dir)
    if (iter_dir / CHECKSUMS_FILE).exists():
        return None
    return (f"{iter_dir} has no {CHECKSUMS_FILE} (written before checksums existed, or the "
            "file was lost): its files are read unverified, so damaged bytes would go unnoticed")


#: (path, size, mtime_ns) of files already verified in this process
_VERIFIED: set[tuple[str, int, int]] = set()


def verify_file(iter_dir: Path, path: Path) -> bool:
    """Check ``path`` (inside ``iter_dir``) against the recorded digest; ``False`` when the
    iteration has no checksums (nothing to check). Raises :class:`IntegrityError`."""
    iter_dir, path = Path(iter_dir), Path(path)
    recorded = read_checksums(iter_dir)
    if recorded is None:
        return False
    name = path.relative_to(iter_dir).as_posix()
    want = recorded.get(name)
    if want is None:
        raise IntegrityError(f"{path} is not listed in {iter_dir / CHECKSUMS_FILE}: it was not "
                             "written with this iteration; remove it or restore the iteration")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return True
    if stat.st_size != want["bytes"]:
        raise IntegrityError(
            f"{path} is truncated or was replaced: {stat.st_size} bytes, {want['bytes']} were "
            f"written. Restore this file, load an earlier iteration, or (not recommended) pass "
            "--no-verify")
    got = file_digest(path, name)
    if got.sha256 != want["sha256"]:
        raise IntegrityError(
            f"{path} is corrupt: its SHA-256 {got.sha256[:16]}... differs from the "
            f"{want['sha256'][:16]}... recorded when it was written (same size, so bytes were "
            "altered on disk). Restore this file, load an earlier iteration, or (not "
            "recommended) pass --no-verify")
    _VERIFIED.add(key)
    return True


def verify_iteration(iter_dir: Path) -> bool:
    """Check every file ``checksums.json`` lists; ``False`` without checksums."""
    recorded = read_checksums(iter_dir)
    if recorded is None:
        return False
    for name in recorded:
        path = Path(iter_dir) / name
        if not path.exists():
            raise IntegrityError(f"{path} is missing: the checkpoint is incomplete "
                                 f"({Path(iter_dir) / CHECKSUMS_FILE} lists it)")
        verify_file(iter_dir, path)
    return True
