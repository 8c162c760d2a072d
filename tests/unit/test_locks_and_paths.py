"""Directory locks, stale-partial clean-up and the output/input overlap rule (no process group)."""

import json
import os
import subprocess
import sys

import pytest

from megatron.sft.runtime.locks import (
    DirectoryLock,
    LockedError,
    lock_path,
    partial_name,
    remove_stale_partials,
    this_host,
)
from megatron.sft.runtime.path_overlap import check_output_separate, overlap


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    first = DirectoryLock.acquire(out, "training run")
    try:
        with pytest.raises(LockedError) as err:
            DirectoryLock.acquire(out, "conversion")
        message = str(err.value)
        assert f"{out} is in use by another training run" in message
        assert f"host {this_host()}, pid {os.getpid()}, started 20" in message
        assert str(lock_path(out)) in message
    finally:
        first.release()
    assert not lock_path(out).exists()  # the owner removes its lock file
    DirectoryLock.acquire(out, "conversion").release()  # and the next writer gets it


def test_lock_of_a_dead_holder_is_taken_over_with_a_message(tmp_path):
    out = tmp_path / "run"
    dead = _dead_pid()
    lock_path(out).write_text(json.dumps({"host": this_host(), "pid": dead,
                                          "started": "2026-01-01T00:00:00Z",
                                          "purpose": "conversion"}))
    said = []
    lock = DirectoryLock.acquire(out, "export", said.append)
    assert len(said) == 1 and f"pid {dead}" in said[0] and "no longer running" in said[0]
    assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    lock.release()


def test_stale_partials_are_removed_live_and_foreign_ones_kept(tmp_path):
    dead = _dead_pid()
    names = {
        "dead": f"model.partial-{this_host()}-{dead}",
        "dead_old_form": f"other.partial-{dead}",
        "live": partial_name("model"),
        "other_host": f"model.partial-another-node-{dead}",
        "download": "model.partial",            # download_hf_models resumes these: never touch
        "iteration": "iter_0000005.partial",    # only under the --save lock
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    said = []
    removed = remove_stale_partials(tmp_path, said.append)
    assert sorted(removed) == sorted([names["dead"], names["dead_old_form"]])
    assert "removed 2 unfinished output(s)" in said[0] and names["dead"] in said[0]
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {names["live"], names["other_host"], names["download"], names["iteration"]}
    under_lock = remove_stale_partials(tmp_path, said.append, locked_iterations=True)
    assert under_lock == [names["iteration"]]


@pytest.mark.parametrize("out, src, how", [
    ("m", "m", "is"), ("m/", "m", "is"), ("root", "root/m", "contains"),
    ("m/mg", "m", "is inside"), ("m_Megatron", "m", None), ("mm", "m", None),
])
def test_overlap(tmp_path, out, src, how):
    assert overlap(tmp_path / out, tmp_path / src) == how


def test_overlap_sees_through_symlinks(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "m")
    with pytest.raises(ValueError, match=r"--save-dir .*link is the same directory as the input "
                                         r"--load-dir .*even with --force"):
        check_output_separate(tmp_path / "link", "--save-dir", {"--load-dir": tmp_path / "m"})
    check_output_separate(tmp_path / "out", "--save-dir", {"--load-dir": tmp_path / "m",
                                                           "--hf-reference": None})


def test_stale_temp_files_of_a_prefix_are_removed_live_and_foreign_ones_kept(tmp_path):
    """The pre-tokenizer's ``PREFIX_*.tmp-[HOST-]PID`` files of a killed run (issue 17)."""
    from megatron.sft.runtime.locks import remove_stale_temp_files, temp_name

    dead = _dead_pid()
    prefix = tmp_path / "ds"
    names = {
        "dead": f"ds_text_document.bin.tmp-{this_host()}-{dead}",
        "dead_old_form": f"ds_stats.json.tmp-{dead}",
        "live": os.path.basename(temp_name(tmp_path / "ds_loss_mask_document.idx")),
        "other_host": f"ds_text_document.idx.tmp-another-node-{dead}",
        "other_prefix": f"ds2_text_document.bin.tmp-{this_host()}-{dead}",
        "dataset": "ds_text_document.bin",
    }
    for name in names.values():
        (tmp_path / name).write_text("x")
    said = []
    removed = remove_stale_temp_files(prefix, said.append)
    assert sorted(removed) == sorted([names["dead"], names["dead_old_form"]])
    assert "removed 2 unfinished file(s)" in said[0] and names["dead"] in said[0]
    assert {p.name for p in tmp_path.iterdir()} == {names[k] for k in
                                                    ("live", "other_host", "other_prefix",
                                                     "dataset")}
    assert remove_stale_temp_files(prefix, said.append) == [] and len(said) == 1


def test_prefix_lock_names_the_holder_and_the_flag(tmp_path):
    from megatron.sft.runtime.locks import PrefixLock

    prefix = tmp_path / "data" / "Tokenized-x-tok-64"
    with PrefixLock.acquire(prefix, "pre-tokenization"):
        assert lock_path(prefix) == tmp_path / "data" / "Tokenized-x-tok-64.lock"
        with pytest.raises(LockedError) as err:
            PrefixLock.acquire(prefix, "pre-tokenization")
    assert (f"{prefix} (the output prefix of Tokenized-x-tok-64_*) is in use by another "
            f"pre-tokenization: host {this_host()}, pid {os.getpid()}, started 20") in str(err.value)
    assert "choose another --output-prefix" in str(err.value)
    assert not lock_path(prefix).exists()
