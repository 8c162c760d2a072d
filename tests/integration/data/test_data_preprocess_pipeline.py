"""End to end: file -> workers -> megatron-core .bin/.idx pair, read back with IndexedDataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron.sft.data.preprocess import PreprocessConfig, PreprocessError, default_output_prefix, preprocess
from megatron.sft.data.render import ConversationRenderer, RenderConfig

REPO = Path(__file__).resolve().parents[3]


def good_records(n):
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                     {"role": "assistant", "content": f"It is {i + 1}."}]})
        elif i % 3 == 1:
            out.append({"conversations": [{"from": "human", "value": "Repeat: " + "la " * (i % 17)},
                                          {"from": "gpt", "value": "la " * (i % 17) + "done"}]})
        else:
            out.append({"instruction": "Translate to German", "input": f"morning {i}", "output": "Guten Morgen"})
    return out


BAD_LINES = [
    (b'{"messages": [{"role": "user", "content": "x"}\n', "malformed_json"),
    (b'{"instruction": "caf\xe9", "output": "y"}\n', "non_utf8"),
    (b'{"instruction": "x"}\n', "missing_field"),
    (b'{"instruction": "x", "output": 5}\n', "wrong_type"),
    (b'{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}\n', "unknown_role"),
    (b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}\n', "empty_assistant"),
    (b'{"messages": [{"role": "user", "content": "x"}]}\n', "no_assistant"),
]


@pytest.fixture
def mixed_file(tmp_path):
    """30 good records with the 7 kinds of bad line interleaved; returns (path, bad line numbers)."""
    path = tmp_path / "mixed.jsonl"
    lines, bad = [], {}
    good = good_records(30)
    for i, record in enumerate(good):
        lines.append(json.dumps(record).encode() + b"\n")
        if i % 4 == 1 and len(bad) < len(BAD_LINES):
            line, reason = BAD_LINES[len(bad)]
            lines.append(line)
            bad[len(lines)] = reason
    path.write_bytes(b"".join(lines))
    return path, bad, good


def read_pair(prefix):
    text = IndexedDataset(prefix + "_text_document")
    mask = IndexedDataset(prefix + "_loss_mask_document")
    return [text[i] for i in range(len(text))], [mask[i] for i in range(len(mask))], text, mask


def test_pair_reads_back_equal_with_bad_lines_reported(tokenizers, tokenizer_dirs, mixed_file, tmp_path):
    path, bad, good = mixed_file
    config = PreprocessConfig(input=str(path), tokenizer_model=str(tokenizer_dirs["llama3"]),
                              output_prefix=str(tmp_path / "out" / "ds"), render=RenderConfig(max_length=512),
                              progress=False, chunk_size=4)
    messages = []
    stats = preprocess(config, log=messages.append).to_dict()
    ids, masks, text, mask = read_pair(str(tmp_path / "out" / "ds"))
    expected = ConversationRenderer(tokenizers["llama3"], RenderConfig(max_length=512)).render_batch(good)
    assert len(ids) == len(expected) == 30
    for got_ids, got_mask, want in zip(ids, masks, expected):
        assert got_ids.tolist() == want.ids.tolist() and got_mask.tolist() == want.mask.tolist()
    assert text.index.dtype == np.uint16 and mask.index.dtype == np.uint8
    assert np.array_equal(text.sequence_lengths, mask.sequence_lengths)
    assert stats["samples_read"] == 37 and stats["samples_written"] == 30
    assert stats["dropped_by_reason"] == {r: 1 for r in bad.values()}
    for line, reason in bad.items():  # every bad record is reported with file:line
        assert any(f"{path}:{line}: skipped ({reason})" in m for m in messages), (line, reason)
    assert stats["tokens"] == sum(len(x) for x in ids)
    assert stats["loss_tokens"] == sum(int(m.sum()) for m in masks)
    assert sum(stats["length_histogram"].values()) == 30
    on_disk = json.loads((tmp_path / "out" / "ds_stats.json").read_text())
    assert on_disk["dropped_by_reason"] == stats["dropped_by_reason"] and on_disk["tokens_per_s"] > 0
    assert not [p for p in os.listdir(tmp_path / "out") if ".tmp-" in p]


def test_output_identical_for_any_worker_count(tokenizer_dirs, mixed_file, tmp_path):
    path, _, _ = mixed_file
    digests = []
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        preprocess(PreprocessConfig(input=str(path), tokenizer_model=str(tokenizer_dirs["chatml"]),
                                    output_prefix=prefix, workers=workers, chunk_size=3, progress=False),
                   log=lambda _: None)
        digests.append([Path(prefix + s).read_bytes() for s in
                        ("_text_document.bin", "_text_document.idx",
                         "_loss_mask_document.bin", "_loss_mask_document.idx")])
    assert digests[0] == digests[1]


def test_strict_stops_with_file_and_line_and_publishes_nothing(tokenizer_dirs, mixed_file, tmp_path):
    path, bad, _ = mixed_file
    first_bad = min(bad)
    prefix = str(tmp_path / "strict")
    with pytest.raises(PreprocessError, match=rf"{path.name}:{first_bad}: .*--strict"):
        preprocess(PreprocessConfig(input=str(path), tokenizer_model=str(tokenizer_dirs["chatml"]),
                                    output_prefix=prefix, strict=True, progress=False))
    assert os.listdir(tmp_path) == [path.name]  # no .bin/.idx, not even temporary ones


def test_truncation_policy_and_nothing_valid(tokenizers, tokenizer_dirs, tmp_path):
    records = good_records(9)
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    full = ConversationRenderer(tokenizers["chatml"], RenderConfig()).render_batch(records)
    lengths = sorted(len(s.ids) for s in full)
    limit = lengths[len(lengths) // 2]  # about half the samples are longer
    too_long = sum(n > limit for n in lengths)
    tok = str(tokenizer_dirs["chatml"])

    def run(name, **render):
        return preprocess(PreprocessConfig(input=str(path), tokenizer_model=tok, output_prefix=str(tmp_path / name),
                                           render=RenderConfig(**render), progress=False))

    dropped = run("a", max_length=limit)
    assert dropped.dropped == {"too_long": too_long} and dropped.samples_written == 9 - too_long
    truncated = run("b", max_length=limit, truncate=True)
    assert truncated.samples_truncated + truncated.dropped["no_loss_tokens"] == too_long
    assert truncated.samples_written == 9 - truncated.dropped["no_loss_tokens"]
    text = IndexedDataset(str(tmp_path / "b_text_document"))  # keep alive: lengths view its mmap
    assert text.sequence_lengths.max() <= limit
    with pytest.raises(PreprocessError, match="no valid sample"):
        run("c", max_length=3)
    assert not list(tmp_path.glob("c_*"))


def test_interrupted_run_leaves_no_valid_looking_files(tokenizer_dirs, tmp_path, monkeypatch):
    from megatron.sft.data import indexed_writer

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good_records(10)))
    calls = {"n": 0}
    real_add_batch = indexed_writer.IndexedPairWriter.add_batch

    def add_then_die(self, ids, mask, lengths):  # the writer gets one call per chunk of 2 records
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_add_batch(self, ids, mask, lengths)

    monkeypatch.setattr(indexed_writer.IndexedPairWriter, "add_batch", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        preprocess(PreprocessConfig(input=str(path), tokenizer_model=str(tokenizer_dirs["chatml"]),
                                    output_prefix=str(tmp_path / "x"), progress=False, chunk_size=2))
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


def test_default_prefix_follows_the_original_usage():
    assert default_output_prefix("assets/data/V-H/V-H.json", "assets/checkpoints/deepseek_tok/", 16384) == \
        "assets/data/V-H/Tokenized-V-H-deepseek_tok-16384"


def test_shell_wrapper_and_cli_exit_codes(tokenizer_dirs, tmp_path):
    data = tmp_path / "ds" / "My-Data.json"
    data.parent.mkdir()
    data.write_text(json.dumps(good_records(8), indent=1))  # a JSON array file
    env = dict(os.environ, PYTHON=sys.executable, EXTRA_ARGS="--no-progress")
    run = subprocess.run(["bash", str(REPO / "scripts/data/tokenize_dataset.sh"), str(tokenizer_dirs["deepseek_r1"]),
                          str(data), "64", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    prefix = str(data.parent / "Tokenized-My-Data-deepseek_r1-64")
    assert len(IndexedDataset(prefix + "_text_document")) == len(IndexedDataset(prefix + "_loss_mask_document")) == 8
    assert json.loads(Path(prefix + "_stats.json").read_text())["samples_written"] == 8

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    cli = [sys.executable, str(REPO / "tools/preprocess_data_sft.py"), "--tokenizer-model",
           str(tokenizer_dirs["chatml"]), "--no-progress"]
    run = subprocess.run(cli + ["--input", str(bad), "--strict"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and f"{bad}:1: malformed JSON" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run(cli + ["--input", str(tmp_path / "nope.jsonl")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "does not exist" in run.stderr and "Traceback" not in run.stderr


def test_writer_add_batch_is_byte_identical_to_add_document_per_sample(tmp_path):
    """Our writer (no megatron-core import) against megatron-core's builder and reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron.sft.data.indexed_writer import IndexedPairWriter, pair_prefixes

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, 40)
    ids = rng.integers(0, 60000, int(lengths.sum())).astype(np.int32)
    mask = rng.integers(0, 2, len(ids)).astype(np.uint8)
    with IndexedPairWriter(str(tmp_path / "fast"), 60000) as writer:
        writer.add_batch(ids[:lengths[:25].sum()], mask[:lengths[:25].sum()], lengths[:25])
        writer.add_batch(ids[:0], mask[:0], lengths[:0])
        writer.add_batch(ids[lengths[:25].sum():], mask[lengths[:25].sum():], lengths[25:])
        writer.commit()
    for prefix, values, dtype in zip(pair_prefixes(str(tmp_path / "ref")), (ids, mask), (writer.token_dtype, np.uint8)):
        builder, offset = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype), 0
        for n in lengths.tolist():
            builder.add_document(values[offset:offset + n], [n])
            offset += n
        builder.finalize(prefix + ".idx")
    for fast, ref in zip(pair_prefixes(str(tmp_path / "fast")), pair_prefixes(str(tmp_path / "ref"))):
        for ext in (".bin", ".idx"):
            assert Path(fast + ext).read_bytes() == Path(ref + ext).read_bytes()
    # and megatron-core's own reader gives back every sample of both files, dtype included
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    text, loss_mask = (IndexedDataset(prefix) for prefix in pair_prefixes(str(tmp_path / "fast")))
    assert len(text) == len(loss_mask) == len(lengths)
    assert text.index.dtype == writer.token_dtype == np.uint16 and loss_mask.index.dtype == np.uint8
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    for i in range(len(lengths)):
        assert np.array_equal(text[i], ids[bounds[i]:bounds[i + 1]])
        assert np.array_equal(loss_mask[i], mask[bounds[i]:bounds[i + 1]])
    assert np.array_equal(text.document_indices, np.arange(len(lengths) + 1))


def test_compressed_tool_data_with_bom_and_a_huge_line_through_the_cli(tokenizers, tokenizer_dirs, tmp_path):
    """A .jsonl.gz as shipped: BOM, custom tools field, reasoning the template ignores, one huge line."""
    import gzip

    from megatron.sft.data.formats import FieldMap

    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    records = []
    for i in range(6):
        records.append({"functions": [weather], "messages": [
            {"role": "user", "content": f"Weather in city {i}?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": str(i)}}}]},
            {"role": "ipython", "content": f"{i} C"},
            {"role": "assistant", "content": f"It is {i} C.", "reasoning_content": "The tool said so."}]})
        records.append({"system": "Be brief.", "conversations": [
            {"from": "human", "value": [{"type": "text", "text": f"{i} + 1?"}]},
            {"from": "gpt", "value": f"{i + 1}", "loss": i % 2 == 0}]})
    lines = [json.dumps(r).encode() for r in records]
    lines.insert(3, b'{"messages": "' + b"x" * 20000 + b'"}')
    data = tmp_path / "chat.jsonl.gz"
    with gzip.open(data, "wb") as f:
        f.write(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    cli = [sys.executable, str(REPO / "tools/preprocess_data_sft.py"), "--input", str(data), "--tokenizer-model",
           str(tokenizer_dirs["llama3_tools"]), "--tools-field", "functions", "--max-record-bytes", "4096",
           "--workers", "2", "--chunk-size", "3", "--no-progress"]
    run = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    prefix = str(tmp_path / "Tokenized-chat-llama3_tools")
    stats = json.loads(Path(prefix + "_stats.json").read_text())
    odd_loss_false = 3  # the ShareGPT records with "loss": false have nothing left to learn
    assert stats["samples_read"] == 13
    assert stats["dropped_by_reason"] == {"record_too_large": 1, "no_loss_tokens": odd_loss_false}
    assert stats["notices"] == {"reasoning_not_rendered": 6}
    assert run.stderr.count("note: ") == 1 and "reasoning_content" in run.stderr
    assert f"{data}:4: skipped (record_too_large)" in run.stderr
    ids, masks, text_ds, mask_ds = read_pair(prefix)  # keep the datasets alive: the arrays view their mmap
    renderer = ConversationRenderer(tokenizers["llama3_tools"], RenderConfig(fields=FieldMap(tools="functions")))
    expected = [s for s in renderer.render_batch(records) if not hasattr(s, "reason")]
    assert len(ids) == len(expected) == 9
    for got_ids, got_mask, want in zip(ids, masks, expected):
        assert got_ids.tolist() == want.ids.tolist() and got_mask.tolist() == want.mask.tolist()
    tok = tokenizers["llama3_tools"]
    first = tok.decode(ids[0].tolist())
    assert "get_weather" in first and "<|start_header_id|>ipython<|end_header_id|>\n\n0 C" in first
