"""Stream raw records out of SFT input files, one at a time, with their file and line.

Supported inputs: ``.jsonl``; ``.json`` holding either JSON lines or one array of objects;
``.parquet``; a directory of those (sorted by name); an HF dataset saved with ``save_to_disk``
(a folder with ``state.json``, or a ``DatasetDict`` folder with ``dataset_dict.json``).

Why raw: parsing JSON is a large share of pre-tokenisation time, so for JSON lines the reader
only splits the file into byte lines and the worker processes decode them
(``parse_payload``). Memory stays constant: nothing holds more than one record or one
Parquet/Arrow batch at a time.

Example::

    >>> [(r.line, r.payload) for r in iter_records("a.jsonl")]
    [(1, b'{"messages": [...]}\\n'), (3, b'{"instruction": ...}\\n')]   # blank line 2 skipped
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from megatron.sft.data.formats import RecordError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_ARROW_BATCH_ROWS = 1024
_SURROGATE = re.compile("[\udc80-\udcff]")


@dataclass
class RawRecord:
    """``payload`` is JSON bytes (parsed in a worker), an already parsed object, or an error."""

    source: str
    line: int
    payload: Any


class InputError(ValueError):
    """The input path itself is unusable (missing, unsupported, empty folder)."""


def parse_payload(payload: Any) -> Any:
    """Bytes of one JSON line -> object; already parsed objects pass through; errors re-raise."""
    if isinstance(payload, RecordError):
        raise payload
    if not isinstance(payload, (bytes, bytearray)):
        return payload
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(
            "non_utf8", f"invalid UTF-8 byte 0x{payload[exc.start]:02x} at byte {exc.start + 1}"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError("malformed_json", f"malformed JSON: {exc.msg} at column {exc.colno}") from None


def list_input_files(path: str | Path, split: str | None = None) -> list[tuple[str, Path]]:
    """Resolve ``path`` to ``[(kind, file)]`` with kind in ``jsonl | json | parquet | arrow``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {str(path)!r} does not exist; pass an existing file or folder to --input.")
    if path.is_file():
        kind = path.suffix.lower().lstrip(".")
        if kind not in ("jsonl", "json", "parquet", "arrow"):
            raise InputError(
                f"input {str(path)!r} has an unsupported extension {path.suffix!r}; use "
                f".jsonl, .json, .parquet, a folder of those, or an HF save_to_disk folder."
            )
        return [(kind, path)]
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        chosen = split or ("train" if "train" in splits else None)
        if chosen not in splits:
            raise InputError(
                f"{str(path)!r} is a DatasetDict with splits {splits}; choose one with --split."
            )
        return list_input_files(path / chosen)
    if (path / "state.json").exists():
        state = json.loads((path / "state.json").read_text())
        return [("arrow", path / f["filename"]) for f in state["_data_files"]]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
    if not files:
        raise InputError(
            f"folder {str(path)!r} has no .jsonl/.json/.parquet files and is not an HF "
            "save_to_disk folder (no state.json)."
        )
    return [(p.suffix.lower().lstrip("."), p) for p in files]


def iter_records(path: str | Path, split: str | None = None) -> Iterator[RawRecord]:
    """Every record of every file under ``path``, in a fixed order."""
    for kind, file in list_input_files(path, split):
        if kind == "parquet":
            yield from _iter_parquet(file)
        elif kind == "arrow":
            yield from _iter_arrow_stream(file)
        elif kind == "json" and _first_char(file) == "[":
            yield from _iter_json_array(file)
        else:
            yield from _iter_json_lines(file)


def _first_char(file: Path) -> str:
    with open(file, "rb") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1].decode("latin-1")
    return ""


def _iter_json_lines(file: Path) -> Iterator[RawRecord]:
    source = str(file)
    with open(file, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield RawRecord(source, number, line)


def _iter_parquet(file: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=_ARROW_BATCH_ROWS):
        for record in batch.to_pylist():
            row += 1
            yield RawRecord(str(file), row, record)


def _iter_arrow_stream(file: Path) -> Iterator[RawRecord]:
    import pyarrow as pa

    row = 0
    with pa.memory_map(str(file)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield RawRecord(str(file), row, record)


def _iter_json_array(file: Path, chunk_chars: int = 1 << 20) -> Iterator[RawRecord]:
    """Stream the elements of a top-level JSON array without loading the whole file.

    Line numbers are those where each element starts. After a malformed element the rest of the
    file cannot be re-synchronised safely, so it is reported once and the file ends there.
    """
    source = str(file)
    decoder = json.JSONDecoder()
    with open(file, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape")
        buf, pos, line, eof = "", 0, 1, False

        def fill(min_extra: int = chunk_chars) -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            more = text.read(max(chunk_chars, min_extra))
            if not more:
                eof = True
                return False
            buf = buf[pos:] + more
            pos = 0
            return True

        def skip_space() -> str:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or not fill():
                    return buf[pos] if pos < len(buf) else ""

        skip_space()
        pos += 1  # the '[' checked by the caller
        expect_value = True
        while True:
            ch = skip_space()
            if ch == "]":
                return
            if ch == "":
                yield RawRecord(source, line, RecordError("malformed_json", "unterminated JSON array"))
                return
            if not expect_value:
                if ch == ",":
                    pos += 1
                    expect_value = True
                    continue
                msg = f"expected ',' or ']' between array elements, found {ch!r}; the rest of this file is skipped"
                yield RawRecord(source, line, RecordError("malformed_json", msg))
                return
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    complete = end < len(buf) or eof
                except json.JSONDecodeError as exc:
                    obj, end, complete, error = None, -1, False, exc
                if complete or not fill(len(buf) - pos + chunk_chars):
                    break
            if end < 0:
                msg = f"malformed JSON in array element: {error.msg}; the rest of this file is skipped"
                yield RawRecord(source, line, RecordError("malformed_json", msg))
                return
            element_line = line
            chunk = buf[pos:end]
            line += chunk.count("\n")
            pos = end
            if _SURROGATE.search(chunk):
                payload: Any = RecordError("non_utf8", "invalid UTF-8 bytes in this array element")
            else:
                payload = obj
            yield RawRecord(source, element_line, payload)
            expect_value = False
