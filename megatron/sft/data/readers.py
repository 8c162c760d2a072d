"""Stream raw records out of SFT input files, one at a time, with their file and line.

Supported inputs: ``.jsonl``; ``.json`` holding either JSON lines or one array of objects;
both also compressed (``.gz``, ``.bz2``, ``.xz``, and ``.zst`` when ``zstandard`` is installed),
decompressed as a stream; ``.parquet``; a directory of those (sorted by name); an HF dataset
saved with ``save_to_disk`` (a folder with ``state.json``, or a ``DatasetDict`` folder with
``dataset_dict.json``). A UTF-8 byte order mark at the start of a file is skipped.

A JSON line longer than ``max_record_bytes`` is reported as a ``record_too_large`` bad record
without being parsed or even held in memory: the reader reads at most that many bytes of it and
streams past the rest.

Why raw: parsing JSON is a large share of pre-tokenisation time, so for JSON lines the reader
only splits the file into byte lines and the worker processes decode them
(``parse_payload``). Memory stays constant: nothing holds more than one record or one
Parquet/Arrow batch at a time.

Example::

    >>> [(r.line, r.payload) for r in iter_records("a.jsonl")]
    [(1, b'{"messages": [...]}\\n'), (3, b'{"instruction": ...}\\n')]   # blank line 2 skipped
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from megatron.sft.data.formats import RecordError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
#: compressed suffix -> opener of a binary stream (JSON files only: Parquet compresses itself)
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
DEFAULT_MAX_RECORD_BYTES = 64 << 20
_ARROW_BATCH_ROWS = 1024
_SKIP_CHUNK = 1 << 20
_BOM = b"\xef\xbb\xbf"
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


def split_compression(name: str) -> tuple[str, str | None]:
    """``"chat.jsonl.gz"`` -> ``("chat.jsonl", ".gz")``; ``"chat.jsonl"`` -> ``("chat.jsonl", None)``."""
    lower = name.lower()
    for ext in COMPRESSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)], ext
    return name, None


def _kind(file: Path) -> str | None:
    """``jsonl | json | parquet | arrow`` from the name, or None when unsupported."""
    name, compression = split_compression(file.name)
    kind = Path(name).suffix.lower().lstrip(".")
    if compression is not None:
        return kind if kind in ("jsonl", "json") else None
    return kind if kind in ("jsonl", "json", "parquet", "arrow") else None


def _extension(file: Path) -> str:
    """``x.parquet.gz`` -> ``.parquet.gz``; ``my.data.csv`` -> ``.csv``."""
    name, compression = split_compression(file.name)
    return Path(name).suffix + (compression or "")


def open_input(file: Path) -> BinaryIO:
    """A binary stream of ``file``, decompressed on the fly for the suffixes in ``COMPRESSIONS``."""
    compression = split_compression(file.name)[1]
    if compression == ".gz":
        return gzip.open(file, "rb")
    if compression == ".bz2":
        return bz2.open(file, "rb")
    if compression == ".xz":
        return lzma.open(file, "rb")
    if compression == ".zst":
        zstandard = _zstandard(file)
        # read_across_frames: multi-threaded zstd writes several frames into one file
        reader = zstandard.ZstdDecompressor().stream_reader(open(file, "rb"), read_across_frames=True,
                                                            closefd=True)
        return io.BufferedReader(reader)
    return open(file, "rb")


def _zstandard(file: Path):
    try:
        import zstandard
    except ImportError:
        raise InputError(f"{str(file)!r} is zstd-compressed, which needs the zstandard package: "
                         "pip install zstandard (or decompress it first: zstd -d FILE).") from None
    return zstandard


def list_input_files(path: str | Path, split: str | None = None) -> list[tuple[str, Path]]:
    """Resolve ``path`` to ``[(kind, file)]`` with kind in ``jsonl | json | parquet | arrow``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {str(path)!r} does not exist; pass an existing file or folder to --input.")
    if path.is_file():
        kind = _kind(path)
        if kind is None:
            raise InputError(
                f"input {str(path)!r} has an unsupported extension {_extension(path)!r}; use "
                f".jsonl or .json (optionally {'/'.join(COMPRESSIONS)}), .parquet, a folder of those, "
                f"or an HF save_to_disk folder."
            )
        if split_compression(path.name)[1] == ".zst":
            _zstandard(path)  # fail before any work when the package is missing
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
    files = sorted(p for p in path.iterdir() if p.is_file() and _kind(p) in ("jsonl", "json", "parquet"))
    if not files:
        raise InputError(
            f"folder {str(path)!r} has no .jsonl/.json/.parquet files (compressed or not) and is not "
            "an HF save_to_disk folder (no state.json)."
        )
    for p in files:
        if split_compression(p.name)[1] == ".zst":
            _zstandard(p)
    return [(_kind(p), p) for p in files]


def iter_records(path: str | Path, split: str | None = None,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[RawRecord]:
    """Every record of every file under ``path``, in a fixed order."""
    for kind, file in list_input_files(path, split):
        if kind == "parquet":
            yield from _iter_parquet(file)
        elif kind == "arrow":
            yield from _iter_arrow_stream(file)
        elif kind == "json" and _first_char(file) == "[":
            yield from _iter_json_array(file)
        else:
            yield from _iter_json_lines(file, max_record_bytes)


def _first_char(file: Path) -> str:
    with open_input(file) as f:
        first = True
        while chunk := f.read(4096):
            if first and chunk.startswith(_BOM):
                chunk = chunk[len(_BOM):]
            first = False
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1].decode("latin-1")
    return ""


def _iter_json_lines(file: Path, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[RawRecord]:
    """Byte lines, each read with ``readline(limit)``: a huge line is never held whole.

    A line of ``max_record_bytes`` bytes (plus its newline) is kept; one byte more and the reader
    keeps only the first ``max_record_bytes + 1`` bytes, skips the rest in 1 MiB reads, and yields
    a ``record_too_large`` error for that line number.
    """
    source = str(file)
    with open_input(file) as f:
        number = 0
        while line := f.readline(max_record_bytes + 1):
            number += 1
            if number == 1 and line.startswith(_BOM):
                line = line[len(_BOM):]
            if len(line) > max_record_bytes and not line.endswith(b"\n"):
                size = len(line) + _skip_rest_of_line(f)
                yield RawRecord(source, number, RecordError(
                    "record_too_large", f"the line is {size:,} bytes, above --max-record-bytes "
                    f"{max_record_bytes:,}; skipped without parsing"))
            elif line.strip():
                yield RawRecord(source, number, line)


def _skip_rest_of_line(f: BinaryIO) -> int:
    """Read past the current line in bounded pieces; returns the bytes skipped (newline excluded)."""
    skipped = 0
    while piece := f.readline(_SKIP_CHUNK):
        if piece.endswith(b"\n"):
            return skipped + len(piece) - 1
        skipped += len(piece)
    return skipped


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
    with open_input(file) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape")
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
