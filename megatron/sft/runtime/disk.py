"""A full disk is a user's problem with a one-line answer, not ``OSError 28`` or torch's
``basic_ios::clear: iostream error``.

Every writer of large outputs (checkpoint saves, convert, export, reshard, the pre-tokenizer)
checks the free space it needs before it starts (:func:`check_free_space`) and translates a
write that fails for lack of space into :class:`DiskFullError` (:func:`disk_full_guard`), whose
message names the directory, what was needed and what is free. The callers remove their own
partial output; the error says that nothing was published.

Example::

    with disk_full_guard("runs/sft", needed_bytes=3 * 2**30, what="checkpoint iteration 200"):
        torch.save(state, path)
    # DiskFullError: no space left on runs/sft while writing checkpoint iteration 200: need
    # about 3.0 GiB, 0.4 GiB free. Free some space or write to a bigger disk; ...
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

#: what torch's C++ writers put in the RuntimeError when a write() fails
_CXX_WRITE_FAILURES = ("file write failed", "iostream error", "No space left", "basic_ios",
                       "unexpected pos")


class DiskFullError(ValueError):
    """Not enough space for an output; nothing half-written is left published."""


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``, ``3 * 2**30 -> '3.0 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def free_bytes(path: "str | Path") -> int:
    """Free space on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _message(directory: "str | Path", what: str, needed: Optional[int], free: int) -> str:
    need = f"need about {human_bytes(needed)}, " if needed else ""
    return (f"no space left on {directory} while writing {what}: {need}{human_bytes(free)} "
            "free. Free some space or write to a bigger disk; nothing was published, and "
            "outputs completed before are intact")


def check_free_space(directory: "str | Path", needed_bytes: int, what: str) -> None:
    """Refuse to start writing ``what`` when ``directory``'s filesystem cannot hold it."""
    free = free_bytes(directory)
    if needed_bytes > free:
        raise DiskFullError(_message(directory, what, needed_bytes, free))


def is_disk_full(exc: BaseException, directory: "str | Path") -> bool:
    """Whether ``exc`` is a write that failed for lack of space: ``ENOSPC``/``EDQUOT``, or one
    of torch's C++ write errors while the filesystem is (nearly) full."""
    seen = exc
    while seen is not None:  # torch re-raises a Python writer's OSError as a RuntimeError
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in _CXX_WRITE_FAILURES):
        try:
            return free_bytes(directory) < 64 * 2**20
        except OSError:
            return False
    return False


@contextlib.contextmanager
def disk_full_guard(directory: "str | Path", needed_bytes: Optional[int],
                    what: str) -> Iterator[None]:
    """Turn a write that fails for lack of space into a :class:`DiskFullError`."""
    try:
        yield
    except DiskFullError:
        raise
    except (OSError, RuntimeError) as exc:
        if not is_disk_full(exc, directory):
            raise
        try:
            free = free_bytes(directory)
        except OSError:
            free = 0
        raise DiskFullError(_message(directory, what, needed_bytes, free)) from None
