"""Streaming safetensors reader and writer with bounded memory.

``safetensors.safe_open`` memory-maps whole files, and every page it touches counts toward the
process's resident memory until the file is closed, so reading a model through it costs the
model's size in RSS. The safetensors format is simple (8-byte little-endian header length, a JSON
header of ``name -> dtype, shape, data_offsets``, then raw bytes), so we read each tensor with
one positioned read into its own buffer, and write shards whose header is computed up front
from shapes so tensors can be streamed in one at a time.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Optional

import torch

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    pass


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> tuple[dict, int]:
    """Return ``(header_json, data_start_offset)``."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: truncated safetensors file (no header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 1024 * 1024:
            raise SafetensorsError(f"{path}: implausible header length {length}")
        blob = f.read(length)
    try:
        header = json.loads(blob)
    except json.JSONDecodeError as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
    return header, 8 + length


class SafetensorsSource:
    """All tensors of an HF model directory (single file or sharded with an index)."""

    def __init__(self, model_dir: "str | Path"):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            bins = list(self.dir.glob("*.bin")) + list(self.dir.glob("*.pt"))
            hint = (
                " It has PyTorch pickle weights; re-save them as safetensors "
                "(model.save_pretrained(dir, safe_serialization=True))." if bins else ""
            )
            raise SafetensorsError(f"no *.safetensors files in {self.dir}.{hint}")
        self._entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for name in files:
            path = self.dir / name
            if not path.exists():
                raise SafetensorsError(f"{path} is listed in the index but missing")
            header, start = read_header(path)
            for tensor_name, info in header.items():
                if tensor_name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise SafetensorsError(f"{path}: unsupported dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                self._entries[tensor_name] = (
                    path, _DTYPES[info["dtype"]], tuple(info["shape"]), start + begin, end - begin
                )

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][1]

    def meta(self, name: str) -> torch.Tensor:
        _, dtype, shape, _, _ = self._entries[name]
        return torch.empty(shape, dtype=dtype, device="meta")

    def read(self, name: str) -> torch.Tensor:
        path, dtype, shape, offset, nbytes = self._entries[name]
        expected = _element_size(dtype) * int(torch.Size(shape).numel())
        if expected != nbytes:
            raise SafetensorsError(f"{path}: {name} has {nbytes} bytes, expected {expected}")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            got = f.readinto(buf.numpy()) if nbytes else 0
        if got != nbytes:
            raise SafetensorsError(f"{path}: truncated while reading {name}")
        return buf.view(dtype).reshape(shape)

    def read_range(self, name: str, start: int, count: int, shape: tuple[int, ...]
                   ) -> torch.Tensor:
        """Elements ``start .. start+count`` of tensor ``name`` (row-major) as ``shape``: one
        positioned read of just those bytes (one expert of a fused ``[E, R, C]`` tensor)."""
        path, dtype, full, offset, nbytes = self._entries[name]
        size = _element_size(dtype)
        total = int(torch.Size(full).numel())
        if start < 0 or count < 0 or start + count > total or \
                int(torch.Size(shape).numel()) != count:
            raise SafetensorsError(f"{path}: elements {start}..{start + count} as {shape} are "
                                   f"not inside {name} {full}")
        buf = torch.empty(count * size, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(offset + start * size)
            got = f.readinto(buf.numpy()) if count else 0
        if got != count * size:
            raise SafetensorsError(f"{path}: truncated while reading {name}")
        return buf.view(dtype).reshape(shape)


class StreamingShardWriter:
    """Write one safetensors file whose tensors are known by shape up front, streamed in order."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Optional[dict[str, str]] = None):
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._expected: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for name, dtype, shape in entries:
            nbytes = _element_size(dtype) * int(torch.Size(shape).numel())
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self._expected.append((name, dtype, tuple(shape)))
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._next = 0
        self.nbytes = offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, exp_dtype, exp_shape = self._expected[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (exp_name, exp_dtype, exp_shape):
            raise SafetensorsError(
                f"{self.path}: got {name} {tensor.dtype} {tuple(tensor.shape)}, "
                f"planned {exp_name} {exp_dtype} {exp_shape}"
            )
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            missing = [n for n, _, _ in self._expected[self._next:]]
            self._file.close()
            raise SafetensorsError(f"{self.path}: {len(missing)} planned tensors never written: "
                                   f"{missing[:5]}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def plan_shards(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                max_shard_bytes: int) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Greedy in-order grouping; a tensor larger than the limit gets a shard of its own."""
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = _element_size(entry[1]) * int(torch.Size(entry[2]).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return [s for s in shards if s]


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"512MiB"`` -> 536_870_912, ``"1000"`` -> 1000."""
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6,
             "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)
