"""The pre-tokenizer's output as issue 17 found it: two runs on one prefix mixed their files, a
re-run silently replaced a dataset made with other options, a killed run's ``*.tmp-PID`` files
stayed forever, a full disk was a raw ``OSError 28``, and records with their roles out of order
went unremarked. Each fault is made for real here."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sft_testing import REPO, write_arithmetic_conversations
from megatron.sft.data.indexed_writer import DATASET_SUFFIXES
from megatron.sft.data.preprocess import PreprocessConfig, default_output_prefix, preprocess
from megatron.sft.data.render import RenderConfig
from megatron.sft.data.tiny_tokenizer import save_tiny_tokenizer
from megatron.sft.runtime.locks import this_host

TOOL = REPO / "tools" / "preprocess_data_sft.py"
ENV = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok", template="chatml")


def _cli(tok, data, *extra):
    return [sys.executable, str(TOOL), "--input", str(data), "--tokenizer-model", str(tok),
            "--no-progress", *extra]


def _snapshot(prefix):
    return {s: (Path(prefix + s).read_bytes(), Path(prefix + s).stat().st_mtime_ns)
            for s in DATASET_SUFFIXES}


HOLDER = """
import sys, time
from pathlib import Path
from megatron.sft.runtime.locks import PrefixLock, temp_name
prefix = sys.argv[1]
PrefixLock.acquire(prefix, "pre-tokenization")
for suffix in ("_text_document.bin", "_loss_mask_document.bin"):  # what a writer has open
    Path(temp_name(prefix + suffix)).write_bytes(b"half a dataset")
print("writing", flush=True)
time.sleep(600)
"""


def test_second_writer_is_refused_and_a_killed_writers_leftovers_are_cleaned(tok, tmp_path):
    """A real second process holds PREFIX.lock with its temp files open: a run on that prefix
    stops at start naming it and touches nothing. SIGKILLed, it leaves the lock file and its
    ``*.tmp-HOST-PID`` files: the next run takes the lock over, removes them, saying both."""
    data = write_arithmetic_conversations(tmp_path / "chat.jsonl", 50, seed=0)
    out = tmp_path / "out"
    prefix = str(out / "ds")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, prefix], stdout=subprocess.PIPE,
                              text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "writing"
        before = sorted(p.name for p in out.iterdir())
        second = subprocess.run(_cli(tok, data, "--output-prefix", prefix), capture_output=True,
                                text=True, env=ENV, timeout=120)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert (f"error: {prefix} (the output prefix of ds_*) is in use by another "
                f"pre-tokenization: host {this_host()}, pid {holder.pid}, started 20"
                in second.stderr), second.stderr
        assert f"choose another --output-prefix (lock file: {prefix}.lock)" in second.stderr
        assert sorted(p.name for p in out.iterdir()) == before  # the holder's files, untouched
    finally:
        holder.kill()
        holder.wait()
    temps = sorted(p.name for p in out.glob("ds_*.tmp-*"))
    assert len(temps) == 2 and all(t.endswith(f".tmp-{this_host()}-{holder.pid}") for t in temps)
    said = []
    stats = preprocess(PreprocessConfig(input=str(data), tokenizer_model=str(tok),
                                        output_prefix=prefix, progress=False), log=said.append)
    assert any(f"taking over the lock {prefix}.lock" in s and f"pid {holder.pid}" in s
               for s in said), said
    assert f"removed 2 unfinished file(s) left in {out} by a run that died (e.g. SIGKILL or a " \
           f"node failure): {', '.join(temps)}" in said, said
    assert sorted(p.name for p in out.iterdir()) == sorted("ds" + s for s in DATASET_SUFFIXES)
    assert stats.samples_written == 50


def test_existing_dataset_needs_force_and_is_untouched_without(tok, tmp_path):
    """Was: a re-run with another --loss-on silently replaced the dataset a run was using."""
    data = write_arithmetic_conversations(tmp_path / "chat.jsonl", 20, seed=0)
    prefix = default_output_prefix(str(data), str(tok), 128)
    config = PreprocessConfig(input=str(data), tokenizer_model=str(tok),
                              render=RenderConfig(max_length=128), progress=False)
    first = preprocess(config)
    before = _snapshot(prefix)
    script = ["bash", str(REPO / "scripts/data/tokenize_dataset.sh"), str(tok), str(data), "128", "1"]
    env = dict(ENV, PYTHON=sys.executable, EXTRA_ARGS="--loss-on all --no-progress")
    refused = subprocess.run(script, capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    name = Path(prefix).name
    assert (f"error: {prefix} already holds a tokenized dataset ({name}_text_document.bin, "
            f"{name}_text_document.idx, {name}_loss_mask_document.bin, "
            f"{name}_loss_mask_document.idx, {name}_stats.json), perhaps made with other options "
            "(--loss-on, --prompt-style or the chat template, --seq-length); nothing was changed. "
            "Pass --force (FORCE=1 for scripts/data/tokenize_dataset.sh) to replace it, or choose "
            "another --output-prefix") in refused.stderr
    assert _snapshot(prefix) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["chat.jsonl"] + [name + s for s in DATASET_SUFFIXES])
    # FORCE=1 passes --force (PYTHON=echo prints the command), which replaces the dataset.
    echoed = subprocess.run(script, capture_output=True, text=True, timeout=60,
                            env=dict(env, PYTHON="echo", FORCE="1"))
    assert "--force" in echoed.stdout.split()
    import dataclasses

    again = preprocess(dataclasses.replace(
        config, force=True, render=RenderConfig(max_length=128, loss_on="all")))
    assert again.loss_tokens == again.tokens > first.loss_tokens
    assert json.loads(Path(prefix + "_stats.json").read_text())["loss_tokens"] == again.tokens


def test_roles_out_of_order_are_counted_in_the_notices_and_kept(tok, tmp_path):
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    records = [
        [turn("user", "Hi"), turn("assistant", "Hello")],
        [turn("assistant", "I speak first"), turn("user", "ok"), turn("assistant", "fine")],
        [turn("user", "one"), turn("user", "two"), turn("assistant", "three")],
        [turn("system", "Be brief."), turn("user", "2+3?"), turn("assistant", "5")],
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": r}) + "\n" for r in records))
    said = []
    stats = preprocess(PreprocessConfig(input=str(data), tokenizer_model=str(tok),
                                        output_prefix=str(tmp_path / "ds"), progress=False),
                       log=said.append)
    assert stats.samples_written == 4 and not stats.dropped  # kept, trained on as written
    written = json.loads((tmp_path / "ds_stats.json").read_text())
    assert written["notices"] == {"roles_out_of_order": 2}
    assert any(s.startswith("note: records whose turns are out of the usual order") for s in said)


@pytest.mark.skipif(shutil.which("unshare") is None or subprocess.run(
    ["unshare", "-rm", "true"], capture_output=True).returncode != 0,
    reason="needs user+mount namespaces (unshare -rm) to mount a small tmpfs")
def test_full_disk_is_one_line_and_leaves_nothing(tok, tmp_path):
    """A real full disk: a 64 KiB tmpfs, mounted in a private mount namespace, for an output of
    about 150 KiB. Was: a raw OSError 28 and the *.tmp files left behind."""
    data = write_arithmetic_conversations(tmp_path / "chat.jsonl", 1000, seed=0)
    out = tmp_path / "small_disk"
    out.mkdir()
    script = ('mount -t tmpfs -o size=64k tmpfs "$1" || exit 99; shift; "$@"; rc=$?; '
              'echo "left: $(ls -A "$OUT" | tr "\\n" " ")"; exit $rc')
    cmd = ["unshare", "-rm", "sh", "-c", script, "sh", str(out),
           *_cli(tok, data, "--output-prefix", str(out / "ds"))]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env=dict(ENV, OUT=str(out)))
    if run.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and "Errno" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr
    assert errors[0].startswith(f"error: no space left on {out} while writing the tokenized "
                                f"dataset {out / 'ds'}_*: ")
    assert "Free some space or write to a bigger disk; nothing was published" in errors[0]
    assert run.stdout.strip().endswith("left:"), run.stdout  # no temp file, no lock file
