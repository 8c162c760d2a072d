"""tools/inspect_sft_data.py end to end: a raw file's preview is what the pre-tokenizer writes,
a prefix is read back as megatron-core reads it, --plot writes a PNG, bad input is one line."""

import importlib.util
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from sft_testing import REPO, run_tool

from megatron.sft.data.indexed_reader import open_indexed_pair
from megatron.sft.data.inspect import marked_spans
from megatron.sft.data.inspect_io import RawSource
from megatron.sft.data.preprocess import PreprocessConfig, preprocess
from megatron.sft.data.render import RenderConfig

SEQ = 64
RECORDS = [
    {"messages": [{"role": "user", "content": "What is 2 plus 3?"},
                  {"role": "assistant", "content": "2 plus 3 is 5."},
                  {"role": "user", "content": "And doubled?"},
                  {"role": "assistant", "content": "It is 10 <short>."}]},
    {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]},
    {"instruction": "Repeat", "input": "la " * 40, "output": "la " * 40},  # too long: dropped
    {"messages": [{"role": "user", "content": "x"}]},                      # no assistant: dropped
    {"instruction": "Greet", "input": "", "output": "Hello 🙂 é"},
    {"messages": [{"role": "system", "content": "Think first."},
                  {"role": "user", "content": "7 minus 4?"},
                  {"role": "assistant", "content": "<think>7 - 4</think>3"}]},
]


@pytest.fixture(scope="module")
def data(tokenizer_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    raw = root / "chat.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    tok = str(tokenizer_dirs["chatml"])
    preprocess(PreprocessConfig(input=str(raw), tokenizer_model=tok, output_prefix=str(root / "ds"),
                                render=RenderConfig(max_length=SEQ), progress=False), log=lambda m: None)
    return {"root": root, "raw": str(raw), "tok": tok, "prefix": str(root / "ds")}


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("inspect_sft_data", REPO / "tools/inspect_sft_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(tool, capsys, *argv):
    """The tool as run from a shell (errors through run_cli), in this process: (exit code, out, err)."""
    from megatron.sft.cli import run_cli

    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: tool.main(list(argv)))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_raw_preview_is_what_the_pre_tokenizer_wrote(data):
    source = RawSource(data["raw"], data["tok"], RenderConfig(max_length=SEQ))
    preview = source.preview(list(range(len(RECORDS))), None, 0)
    kept = [s for s in preview if s.ids is not None]
    dropped = {s.title: s.note for s in preview if s.ids is None}
    assert list(dropped) == ["record 2 (chat.jsonl:3)", "record 3 (chat.jsonl:4)"]
    assert "(too_long)" in dropped["record 2 (chat.jsonl:3)"]
    assert "(no_assistant)" in dropped["record 3 (chat.jsonl:4)"]
    text, mask = open_indexed_pair(data["prefix"])
    assert len(text) == len(kept) == 4
    for i, sample in enumerate(kept):
        assert sample.ids.tolist() == text[i].tolist()
        assert sample.mask.tolist() == mask[i].tolist()
    # the numpy reader reads what megatron-core reads
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for name, ours in (("_text_document", text), ("_loss_mask_document", mask)):
        theirs = IndexedDataset(data["prefix"] + name)
        assert np.array_equal(theirs.sequence_lengths, ours.sequence_lengths)
        assert all(np.array_equal(theirs[i], ours[i]) for i in range(len(ours)))
    # the plot of the raw file sees the same cut as the pre-tokenizer made
    hist, _ = source.histograms()
    stats = json.loads((data["root"] / "ds_stats.json").read_text())
    assert stats["seq_length"] == SEQ and hist.over == stats["dropped_by_reason"]["too_long"] == 1


def test_prefix_preview_highlights_the_learned_tokens(tool, data, capsys):
    code, out, _ = run_main(tool, capsys, data["prefix"], "--index", "0", "3", "--color", "never")
    assert code == 0
    assert out.splitlines()[0].startswith(f"{data['prefix']}: 4 samples,")
    assert f"tokenizer {data['tok']}" in out  # from _stats.json
    assert "=== sample 0 of 4: " in out and "2 learned turns ===" in out
    assert out.splitlines()[1] == "learned tokens (loss mask 1) are inside [[...]]"
    body = "\n".join(out.splitlines()[2:])
    assert marked_spans(body) == ["2 plus 3 is 5.<|im_end|>", "It is 10 <short>.<|im_end|>",
                                 "<think>7 - 4</think>3<|im_end|>"]
    code, raw_out, _ = run_main(tool, capsys, "--input", data["raw"], "--tokenizer-model",
                                data["tok"], "--seq-length", str(SEQ), "--index", "5", "--color", "never")
    assert code == 0 and marked_spans(raw_out.split("\n", 2)[2]) == ["<think>7 - 4</think>3<|im_end|>"]


def test_plot_writes_a_png(tool, data, capsys, tmp_path):
    png = tmp_path / "lengths.png"
    code, out, _ = run_main(tool, capsys, data["prefix"], "--plot", str(png), "--index", "0")
    assert code == 0 and f"wrote {png}: 4 samples" in out and f"MAX_LEN {SEQ}: 0 longer" in out
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 600 and height > 300 and png.stat().st_size > 10_000
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize("argv, message", [
    (["{root}/missing"], "no SFT dataset at '{root}/missing'"),
    (["{prefix}", "--index", "9"], r"--index 9 is out of range: there are 4 samples in {prefix} (0..3)"),
    (["--input", "{raw}", "--tokenizer-model", "{tok}", "--index", "6"],
     "--index 6 is out of range: there are 6 records in {raw} (0..5)"),
    (["{prefix}", "--input", "{raw}"], "give a tokenized PREFIX or --input FILE (with --tokenizer-model), not both."),
    ([], "give a tokenized PREFIX or --input FILE (with --tokenizer-model), one of them."),
    (["--input", "{raw}"], "--input needs --tokenizer-model DIR"),
    (["{prefix}", "--loss-on", "all"], "--loss-on only apply with --input"),
    (["{prefix}", "--tokenizer-model", "{root}"], "cannot load a tokenizer from '{root}'"),
])
def test_bad_input_is_one_line_naming_the_fix(tool, data, capsys, argv, message):
    fill = {k: str(v) for k, v in data.items()}
    code, _, err = run_main(tool, capsys, *[a.format(**fill) for a in argv])
    assert code == 2 and "Traceback" not in err
    assert message.format(**fill) in err


def test_shell_launcher_and_start_up_without_torch(data):
    usage = run_tool("scripts/data/inspect_dataset.sh")
    assert usage.returncode == 2 and "Usage: bash scripts/data/inspect_dataset.sh DATASET" in usage.stderr
    run = run_tool("scripts/data/inspect_dataset.sh", data["prefix"], env={"INDEX": "1"})
    assert run.returncode == 0, run.stderr
    assert "=== sample 1 of 4: " in run.stdout and "[[hi<|im_end|>]]" in run.stdout
    # a prefix preview needs neither torch nor transformers (start-up: about a second)
    probe = ("import atexit, runpy, sys; atexit.register(lambda: print('heavy:', sorted(m for m in "
             "('torch', 'transformers', 'megatron.core') if m in sys.modules)));"
             f"sys.argv = ['inspect', {data['prefix']!r}, '--index', '0'];"
             f"runpy.run_path({str(REPO / 'tools/inspect_sft_data.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "heavy: []" in done.stdout
