"""Checksums and readable failures, without a process group: digests equal ``sha256sum``'s,
every kind of damage is named, a full disk and a collective failure read as one line."""

import errno
import hashlib

import pytest
import torch

from megatron.sft.bridge.checkpoint_io import CheckpointError, load_rank_state, save_rank_state
from megatron.sft.bridge.integrity import (
    IntegrityError,
    read_checksums,
    verify_file,
    verify_iteration,
    write_checksums,
)
from megatron.sft.runtime.collective import on_every_rank
from megatron.sft.runtime.disk import DiskFullError, disk_full_guard, human_bytes, is_disk_full
from megatron.sft.runtime.layout import ParallelLayout


def _iteration(tmp_path):
    it = tmp_path / "iter_0000003"
    state = {"model": {"w": torch.arange(4096, dtype=torch.float32)}, "iteration": 3}
    digest = save_rank_state(it, ParallelLayout(), 0, 0, state)
    write_checksums(it, [digest])
    return it, it / digest.name, digest


def test_the_streamed_digest_is_the_files_sha256(tmp_path):
    it, path, digest = _iteration(tmp_path)
    data = path.read_bytes()
    assert digest.name == "mp_rank_00/model_optim_rng.pt" and digest.bytes == len(data)
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert read_checksums(it) == {digest.name: {"bytes": len(data), "sha256": digest.sha256}}
    assert verify_iteration(it) is True
    assert torch.equal(load_rank_state(it, ParallelLayout(), 0, 0)["model"]["w"],
                       torch.arange(4096, dtype=torch.float32))


def test_each_kind_of_damage_is_named(tmp_path):
    it, path, _ = _iteration(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"{path} is corrupt: its SHA-256 .*\(same size"):
        verify_file(it, path)
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(IntegrityError, match="is truncated or was replaced: 100 bytes"):
        load_rank_state(it, ParallelLayout(), 0, 0)
    stray = it / "mp_rank_00" / "extra.pt"
    stray.write_bytes(b"x")
    with pytest.raises(IntegrityError, match="is not listed in"):
        verify_file(it, stray)
    (it / "checksums.json").write_text("{")
    with pytest.raises(IntegrityError, match="checksums.json is unreadable"):
        verify_file(it, path)


def test_without_checksums_nothing_is_verified_and_damage_is_still_one_line(tmp_path):
    it, path, _ = _iteration(tmp_path)
    (it / "checksums.json").unlink()
    assert verify_iteration(it) is False and verify_file(it, path) is False
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=rf"{path} cannot be read .*truncated or corrupt"):
        load_rank_state(it, ParallelLayout(), 0, 0)


def test_disk_full_is_recognised_and_worded(tmp_path):
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)
    wrapped = RuntimeError("unexpected pos 768 vs 662")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped, tmp_path)
    with pytest.raises(DiskFullError, match=rf"no space left on {tmp_path} while writing X: "
                                            r"need about 2.0 GiB, .* free"):
        with disk_full_guard(tmp_path, 2 * 2**30, "X"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError):
        with disk_full_guard(tmp_path, 1, "X"):
            raise PermissionError(errno.EACCES, "no")
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(12) == "12 B"


def test_a_step_without_a_process_group_raises_its_own_error():
    assert on_every_rank(lambda: 7) == 7 and on_every_rank(lambda: 7, gather=True) == [7]
    with pytest.raises(DiskFullError):
        on_every_rank(lambda: (_ for _ in ()).throw(DiskFullError("full")))
