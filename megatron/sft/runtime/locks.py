"""One writer per output: exclusive directory locks, and clean-up of partials left by the dead.

A lock on ``DIR`` is the sibling file ``DIR.lock``, held with ``flock`` for the life of the
writer and holding who that is (host, pid, start time, what it does)::

    runs/sft.lock   {"host": "node3", "pid": 4242, "started": "2026-01-01T10:00:00Z",
                     "purpose": "training run", "command": "tools/train_sft.py --save runs/sft ..."}

The kernel drops a ``flock`` when its holder dies, even by SIGKILL, so a lock file whose lock
is free was left by a dead writer: the next writer takes it over and says whose it was. On
release the owner removes the file. Works on local disks and on NFS (flock is emulated with
byte-range locks there); where ``flock`` is unsupported, the recorded pid is checked instead.

Staging directories are named ``NAME.partial-HOST-PID`` (see ``partial_name``), so a later
writer in the same parent can tell a partial whose owner died on this host (removed, with a
message) from one still being written, or written from another host (kept).
"""

from __future__ import annotations

import atexit
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from megatron.sft.runtime.disk import DiskFullError

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class LockedError(ValueError):
    """Another live writer holds the output. A ``ValueError`` so CLIs print one clear line."""


class NotWritableError(ValueError):
    """An output that cannot be written where it was asked for (one line naming it and why)."""


def this_host() -> str:
    return socket.gethostname().split(".")[0]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(directory: "str | Path") -> Path:
    """``runs/sft`` -> ``runs/sft.lock`` (a sibling: the directory itself may be replaced)."""
    directory = Path(os.path.abspath(directory))
    return directory.with_name(directory.name + ".lock")


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_holder(info: dict) -> str:
    """``host node3, pid 4242, started 2026-01-01T10:00:00Z (tools/train_sft.py ...)``"""
    command = f" ({info['command']})" if info.get("command") else ""
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started "
            f"{info.get('started', '?')}{command}")


def _read_info(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


class DirectoryLock:
    """An exclusive lock on one output directory; ``acquire`` fails fast, never waits.

    Example::

        lock = DirectoryLock.acquire("runs/sft", "training run")   # LockedError if held
        ...                                                          # write runs/sft/...
        lock.release()                                               # also at exit
    """

    def __init__(self, directory: Path, path: Path, fd: Optional[int], info: dict):
        self.directory, self.path, self._fd, self.info = directory, path, fd, info
        self.released = False

    @classmethod
    def acquire(cls, directory: "str | Path", purpose: str, log: Log = _stderr) -> "DirectoryLock":
        directory = Path(os.path.abspath(directory))
        path = lock_path(directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {"host": this_host(), "pid": os.getpid(),
                "started": _utc_now(),
                "purpose": purpose, "command": " ".join(sys.argv)[:300]}
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFullError(
                        f"no space left on {path.parent}: cannot even create the lock file "
                        f"{path.name}. Free some space (unfinished outputs of runs that died are "
                        "named *.partial*) and start again") from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _read_info(path)
                for _ in range(20):  # the holder may not have written who it is yet
                    if holder:
                        break
                    time.sleep(0.05)
                    holder = _read_info(path)
                cls._refuse(directory, path, holder)
            except OSError as exc:  # no flock on this filesystem: trust the recorded pid
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                previous = _read_info(path)
                if previous and (previous.get("host") != info["host"]
                                 or pid_alive(int(previous.get("pid", -1)))):
                    os.close(fd)
                    cls._refuse(directory, path, previous)
            # The previous owner may have removed the file between our open and flock: then we
            # locked an orphan inode, and must start again on the new file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        previous = _read_info(path)
        if (previous.get("pid"), previous.get("host")) not in ((None, None),
                                                              (info["pid"], info["host"])):
            log(f"taking over the lock {path} from a writer that is no longer running "
                f"({describe_holder(previous)}; purpose: {previous.get('purpose', '?')})")
        lock = cls(directory, path, fd, info)
        atexit.register(lock.release)
        lock.record_holder()
        return lock

    def record_holder(self) -> bool:
        """Write who holds the lock into the lock file. On a full disk the lock is still held
        (``flock`` needs no space) and this returns ``False``: the caller clears stale partials
        to make room, then calls it again."""
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(self.info) + "\n").encode(), 0)
            os.fsync(self._fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            return False
        return True

    @staticmethod
    def _refuse(directory: Path, path: Path, holder: dict) -> None:
        raise LockedError(
            f"{directory} is in use by another {holder.get('purpose', 'writer')}: "
            f"{describe_holder(holder)}. Two writers would mix their files; wait for it to "
            f"finish or stop it, or choose another output directory (lock file: {path})"
        )

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        try:
            if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                os.unlink(self.path)  # while still locked, so no one can lock the old inode
        except OSError:
            pass
        finally:
            os.close(self._fd)

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# -- can an output be written at all? ----------------------------------------------------------
_WHY = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
        errno.EROFS: "a read-only filesystem", errno.ENOENT: "the filesystem takes no new files"}


def unwritable_reason(flag: str, directory: "str | Path", exc: OSError) -> str:
    """One line for an output ``directory`` (given as ``flag``) that ``exc`` says cannot be
    written: a file where a parent directory should be, or a parent that refuses new files.

    Example: ``--save-hf notes.txt/out`` -> ``--save-hf .../notes.txt/out: .../notes.txt is a
    file, not a directory, so nothing can be written under it; choose another --save-hf``.
    """
    directory = Path(os.path.abspath(directory))
    for p in (directory, *directory.parents):
        if os.path.lexists(p) and not p.is_dir():
            return (f"{flag} {directory}: {p} is a file, not a directory, so nothing can be "
                    f"written under it; choose another {flag}")
    parent = next(p for p in directory.parents if p.is_dir())
    why = _WHY.get(exc.errno, exc.strerror or type(exc).__name__)
    return (f"{flag} {directory}: cannot write in {parent} ({why}); choose a directory you can "
            f"write to as {flag}, or fix that one")


def check_writable(directory: "str | Path", flag: str, purpose: str) -> None:
    """Before a run that writes ``directory`` at its end starts: take and release the lock an
    export takes there (creating the parents, the ``DIR.lock`` file beside it and its ``flock``:
    what ``--save`` needs at start), so a read-only parent, a file in the path, a filesystem
    that refuses new files, or another writer holding it, is one line now (``ValueError``),
    not a traceback after hours of training. A filesystem without ``flock`` passes, as for
    ``--save``."""
    try:
        lock = DirectoryLock.acquire(directory, purpose, log=lambda message: None)
    except (LockedError, DiskFullError):
        raise
    except OSError as exc:
        raise NotWritableError(unwritable_reason(flag, directory, exc)) from None
    lock.release()


# -- partials ---------------------------------------------------------------------------------
_PARTIAL = re.compile(r"^(?P<name>.+)\.partial-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


def partial_name(name: str) -> str:
    """``model`` -> ``model.partial-node3-4242``: who writes it, for ``remove_stale_partials``."""
    return f"{name}.partial-{this_host()}-{os.getpid()}"


def remove_stale_partials(parent: "str | Path", log: Log = _stderr,
                          locked_iterations: bool = False) -> list[str]:
    """Remove the ``*.partial-[HOST-]PID`` directories in ``parent`` whose writer is dead on
    this host; with ``locked_iterations`` (the caller holds the lock on ``parent``, a training
    ``--save`` directory) also ``iter_*.partial`` directories, which only that lock's holder
    writes. Partials of live processes or other hosts are kept. Returns the removed names.

    Example: ``out.partial-node3-999`` (pid 999 dead on node3) is removed;
    ``out.partial-node3-<a live pid>`` and ``out.partial-node7-999`` are kept.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    host, removed = this_host(), []
    for entry in sorted(parent.iterdir()):
        if not entry.is_dir() or entry.is_symlink():
            continue
        m = _PARTIAL.match(entry.name)
        if m:
            owner_host = m.group("host") or host  # the old name form had no host
            stale = owner_host == host and not pid_alive(int(m.group("pid")))
        else:
            stale = locked_iterations and re.fullmatch(r"iter_\d+\.partial", entry.name) is not None
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    if removed:
        log(f"removed {len(removed)} unfinished output(s) left in {parent} by processes that "
            f"died (e.g. SIGKILL or a node failure): {', '.join(removed)}")
    return removed


class exclusive_output:  # noqa: N801 - used like a function: ``with exclusive_output(out, ...)``
    """Lock ``out_dir`` and clear stale partials beside it, for a converter's output."""

    def __init__(self, out_dir: "str | Path", purpose: str, log: Log = _stderr):
        self.out_dir, self.purpose, self.log = Path(out_dir), purpose, log
        self.lock: Optional[DirectoryLock] = None

    def __enter__(self) -> DirectoryLock:
        self.lock = DirectoryLock.acquire(self.out_dir, self.purpose, self.log)
        remove_stale_partials(self.lock.directory.parent, self.log)
        self.lock.record_holder()  # again, if a full disk needed the partials gone first
        return self.lock

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()


# -- outputs that are a prefix of files (the pre-tokenizer's dataset pair) ----------------------
class PrefixLock(DirectoryLock):
    """The lock on the files of one output prefix: ``out/ds`` (writing ``out/ds_text_document.bin``
    and the others) is locked through ``out/ds.lock``, as a directory is through ``DIR.lock``.

    Example::

        with PrefixLock.acquire("data/Tokenized-x-tok-4096", "pre-tokenization"):
            ...   # LockedError naming the holder if another writer has it
    """

    @staticmethod
    def _refuse(directory: Path, path: Path, holder: dict) -> None:
        raise LockedError(
            f"{directory} (the output prefix of {directory.name}_*) is in use by another "
            f"{holder.get('purpose', 'writer')}: {describe_holder(holder)}. Two writers would "
            "mix their files; wait for it to finish or stop it, or choose another "
            f"--output-prefix (lock file: {path})"
        )


_TEMP = re.compile(r"^(?P<name>.+)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


def temp_name(path: "str | Path") -> str:
    """``out/ds_stats.json`` -> ``out/ds_stats.json.tmp-node3-4242``: a file being written, and
    by whom, for ``remove_stale_temp_files``."""
    return f"{path}.tmp-{this_host()}-{os.getpid()}"


def remove_stale_temp_files(prefix: "str | Path", log: Log = _stderr) -> list[str]:
    """Remove the files ``PREFIX_*.tmp-[HOST-]PID`` beside ``prefix`` whose writer is dead on
    this host (a run killed before it renamed them into place); call it holding the
    ``PrefixLock``. Temp files of live processes or other hosts are kept, as partials are by
    ``remove_stale_partials`` (the old ``.tmp-PID`` form, without a host, counts as this host's).

    Example: ``ds_text_document.bin.tmp-node3-999`` (pid 999 dead on node3) is removed;
    ``ds_stats.json.tmp-node3-<a live pid>`` and ``ds_text_document.bin.tmp-node7-999`` are kept.
    """
    prefix = Path(os.path.abspath(prefix))
    parent = prefix.parent
    if not parent.is_dir():
        return []
    host, removed = this_host(), []
    for entry in sorted(parent.iterdir()):
        m = _TEMP.match(entry.name)
        if not m or not m.group("name").startswith(prefix.name + "_") or not entry.is_file() \
                or entry.is_symlink():
            continue
        if (m.group("host") or host) == host and not pid_alive(int(m.group("pid"))):
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    if removed:
        log(f"removed {len(removed)} unfinished file(s) left in {parent} by a run that died "
            f"(e.g. SIGKILL or a node failure): {', '.join(removed)}")
    return removed
