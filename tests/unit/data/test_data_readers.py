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
