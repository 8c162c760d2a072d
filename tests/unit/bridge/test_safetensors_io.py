"""Our streaming reader/writer against the safetensors library."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron.sft.bridge.safetensors_io import (
    SafetensorsError,
    SafetensorsSource,
    StreamingShardWriter,
    parse_size,
    plan_shards,
    shard_file_names,
)


def test_reader_matches_library(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "model.safetensors")
    src = SafetensorsSource(tmp_path)
    assert sorted(src.names()) == sorted(tensors)
    for name, t in tensors.items():
        got = src.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
        assert src.meta(name).shape == t.shape and src.meta(name).is_meta


def test_reader_follows_index(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "m-1.safetensors")
    save_file({"y": torch.zeros(3)}, tmp_path / "m-2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "m-1.safetensors", "y": "m-2.safetensors"}}))
    src = SafetensorsSource(tmp_path)
    assert torch.equal(src.read("y"), torch.zeros(3))


def test_writer_output_loads_with_library(tmp_path):
    tensors = [("w", torch.randn(4, 4)), ("b", torch.randn(4).half()), ("i", torch.arange(5))]
    writer = StreamingShardWriter(tmp_path / "s.safetensors",
                                  [(n, t.dtype, tuple(t.shape)) for n, t in tensors])
    for n, t in tensors:
        writer.write(n, t)
    writer.close()
    loaded = load_file(tmp_path / "s.safetensors")
    for n, t in tensors:
        assert torch.equal(loaded[n], t)


def test_writer_rejects_unplanned_tensor(tmp_path):
    writer = StreamingShardWriter(tmp_path / "s.safetensors", [("w", torch.float32, (2,))])
    with pytest.raises(SafetensorsError, match="planned w"):
        writer.write("w", torch.zeros(3))


def test_missing_weights_message(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(SafetensorsError, match="re-save them as safetensors"):
        SafetensorsSource(tmp_path)


def test_shard_planning():
    f = torch.float32
    entries = [("a", f, (10,)), ("b", f, (10,)), ("c", f, (100,)), ("d", f, (1,))]
    shards = plan_shards(entries, 80)
    assert [[e[0] for e in s] for s in shards] == [["a", "b"], ["c"], ["d"]]
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(3)[1] == "model-00002-of-00003.safetensors"
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 << 20
