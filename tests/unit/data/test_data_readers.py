"""Readers stream every supported input with file:line, and report malformed input per record."""

import json

import pytest

from megatron.sft.data.formats import RecordError
from megatron.sft.data.readers import InputError, iter_records, list_input_files, parse_payload

RECORDS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]


def parsed(path, **kw):
    out = []
    for r in iter_records(path, **kw):
        try:
            out.append((r.line, parse_payload(r.payload)))
        except RecordError as err:
            out.append((r.line, err.reason))
    return out


def test_jsonl_lines_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")
    assert parsed(path) == [(1, RECORDS[0]), (3, RECORDS[1])]


def test_json_file_may_hold_json_lines_like_the_downloader_writes(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert [r for _, r in parsed(path)] == RECORDS


def test_json_array_streams_with_line_numbers(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS, indent=2))
    got = parsed(path)
    assert [r for _, r in got] == RECORDS
    assert got[0][0] == 2 and got[1][0] == 6  # each element's first line in the pretty file
    from megatron.sft.data import readers

    small = list(readers._iter_json_array(path, chunk_chars=7))  # tiny chunks: same result
    assert [r.payload for r in small] == RECORDS and [r.line for r in small] == [l for l, _ in got]


def test_json_array_malformed_element_and_bad_bytes(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'[{"instruction": "ok", "output": "x"},\n {"instruction": "\xff", "output": "y"},\n {oops}]')
    assert parsed(path) == [(1, RECORDS[0] | {"instruction": "ok", "output": "x"}), (2, "non_utf8"), (3, "malformed_json")]
    path.write_text('[{"a": 1} {"b": 2}]')
    assert parsed(path) == [(1, {"a": 1}), (1, "malformed_json")]
    path.write_text('[{"a": 1},')
    assert parsed(path)[-1] == (1, "malformed_json")


def test_jsonl_bad_lines_are_reported_per_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": \n{"a": "\xc3\x28"}\n')
    assert parsed(path) == [(1, {"a": 1}), (2, "malformed_json"), (3, "non_utf8")]
    with pytest.raises(RecordError, match="column"):
        parse_payload(b'{"a": }')


def test_parquet_folder_and_hf_save_to_disk(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mixed"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(RECORDS[:3]), folder / "a.parquet")
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[3:]))
    (folder / "notes.txt").write_text("ignored")
    assert [r for _, r in parsed(folder)] == RECORDS
    assert [line for line, _ in parsed(folder / "a.parquet")] == [1, 2, 3]

    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "hf"))
    assert [r for _, r in parsed(tmp_path / "hf")] == RECORDS
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:2]),
                          "test": datasets.Dataset.from_list(RECORDS[2:])}).save_to_disk(str(tmp_path / "dd"))
    assert [r for _, r in parsed(tmp_path / "dd")] == RECORDS[:2]
    assert [r for _, r in parsed(tmp_path / "dd", split="test")] == RECORDS[2:]
    with pytest.raises(InputError, match="--split"):
        list_input_files(tmp_path / "dd", split="validation")


def test_unusable_paths_say_what_to_do(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_input_files(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(InputError, match="unsupported extension"):
        list_input_files(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .jsonl"):
        list_input_files(tmp_path / "empty")


def _compress(data: bytes, path):
    import bz2
    import gzip
    import lzma

    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    if path.suffix == ".zst":
        import zstandard

        half = len(data) // 2  # two frames, as multi-threaded zstd writes: both must be read
        c = zstandard.ZstdCompressor()
        path.write_bytes(c.compress(data[:half]) + c.compress(data[half:]))
    else:
        with openers[path.suffix](path, "wb") as f:
            f.write(data)


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
@pytest.mark.parametrize("shape", ["jsonl", "json-array"])
def test_compressed_files_stream_like_plain_ones(tmp_path, suffix, shape):
    if suffix == ".zst":
        pytest.importorskip("zstandard")
    if shape == "jsonl":
        plain = tmp_path / "d.jsonl"
        plain.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    else:
        plain = tmp_path / "d.json"
        plain.write_text(json.dumps(RECORDS, indent=2))
    packed = tmp_path / f"z{plain.suffix}{suffix}"
    _compress(plain.read_bytes(), packed)
    assert list_input_files(packed) == [(plain.suffix.lstrip("."), packed)]
    assert parsed(packed) == parsed(plain)
    folder = tmp_path / "folder"
    folder.mkdir()
    packed.rename(folder / packed.name)
    assert [r for _, r in parsed(folder)] == RECORDS


def test_zst_without_zstandard_says_how_to_fix(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed
    (tmp_path / "d.jsonl.zst").write_bytes(b"")
    with pytest.raises(InputError, match="pip install zstandard"):
        list_input_files(tmp_path / "d.jsonl.zst")
    (tmp_path / "d.parquet.gz").write_bytes(b"")
    with pytest.raises(InputError, match="unsupported extension '.parquet.gz'"):
        list_input_files(tmp_path / "d.parquet.gz")


def test_utf8_byte_order_mark_is_skipped(tmp_path):
    bom = b"\xef\xbb\xbf"
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(bom + b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS))
    assert parsed(lines) == [(i + 1, r) for i, r in enumerate(RECORDS)]
    array = tmp_path / "bom.json"
    array.write_bytes(bom + json.dumps(RECORDS, indent=1).encode())
    assert [r for _, r in parsed(array)] == RECORDS
    gz = tmp_path / "bom.jsonl.gz"
    _compress(lines.read_bytes(), gz)
    assert parsed(gz) == parsed(lines)


def test_a_huge_line_is_dropped_unparsed_in_bounded_memory(tmp_path):
    import tracemalloc

    huge = b'{"instruction": "' + b"x" * (30 << 20) + b'", "output": "y"}'
    path = tmp_path / "huge.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + huge + b"\n" + json.dumps(RECORDS[1]).encode())
    tracemalloc.start()
    got = parsed(path, max_record_bytes=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == [(1, RECORDS[0]), (2, "record_too_large"), (3, RECORDS[1])]
    assert peak < 8 << 20, f"peak {peak:,} bytes: the 30 MB line was held in memory"
    [_, error, _] = list(iter_records(path, max_record_bytes=1 << 20))
    assert f"{len(huge):,} bytes" in str(error.payload) and "--max-record-bytes" in str(error.payload)
    # exactly at the limit is kept, one byte more is not (the newline does not count)
    line = json.dumps(RECORDS[2]).encode()
    path.write_bytes(line + b"\n" + line)
    assert parsed(path, max_record_bytes=len(line)) == [(1, RECORDS[2]), (2, RECORDS[2])]
    assert parsed(path, max_record_bytes=len(line) - 1) == [(1, "record_too_large"), (2, "record_too_large")]
