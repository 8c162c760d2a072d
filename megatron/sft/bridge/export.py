"""Megatron checkpoint (any TP x PP x VPP) -> HuggingFace safetensors directory.

The architecture table gives every output tensor's name and shape, and the (``mmap``-opened,
so unread) rank files give dtypes and prove every needed tensor is present, before any output
exists; shard headers are then written up front and real tensors streamed into them one at a
time, one pipeline stage mapped at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from megatron.sft.bridge.checkpoint_io import (
    CheckpointError,
    CheckpointMetadata,
    check_output_dir,
    dtype_name,
    write_staged,
)
from megatron.sft.bridge.convert import load_hf_config, refuse_non_finite
from megatron.sft.bridge.fused_export import fused_export
from megatron.sft.bridge.reader import CheckpointReader, CoverageError  # noqa: F401
from megatron.sft.bridge.safetensors_io import (
    StreamingShardWriter,
    parse_size,
    plan_shards,
    shard_file_names,
)
from megatron.sft.runtime.disk import check_free_space, disk_full_guard
from megatron.sft.runtime.locks import exclusive_output
from megatron.sft.runtime.path_overlap import check_output_separate

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: config fields that must agree between the checkpoint and a reference HF directory
_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "vocab_size")


@dataclasses.dataclass
class ExportOptions:
    iteration: Optional[int] = None
    #: cast floating-point weights; ``None`` keeps the checkpoint's dtype
    dtype: Optional[torch.dtype] = None
    max_shard_size: str = "5GB"
    force: bool = False
    progress: bool = True
    #: check every rank file against the checkpoint's checksums first (``--no-verify``)
    verify: bool = True
    #: where notices go (a dropped quantization_config, put-back MTP layers)
    log: Callable[[str], None] = print


@dataclasses.dataclass
class _MtpTensors:
    """The HF reference's multi-token-prediction tensors, for export to put back."""

    source: object
    entries: list
    dequantised: bool

    def tensors(self):
        for name, dtype, _ in self.entries:
            t = self.source.read(name)
            yield name, (t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t)


def mtp_tensors(config: dict, hf_ref_dir: "str | Path | None",
                dtype: torch.dtype) -> "Optional[_MtpTensors]":
    """DeepSeek-V3's MTP layer(s) (``model.layers.{num_hidden_layers}...``), never converted,
    read from ``hf_ref_dir`` as they are (dequantised and cast to ``dtype`` when FP8);
    ``None`` without MTP layers or without a reference holding them."""
    from megatron.sft.bridge.architectures import shape_of
    from megatron.sft.bridge.fp8_source import dequantizing_source
    from megatron.sft.bridge.safetensors_io import SafetensorsSource

    spec, shape = shape_of(config)
    if shape.mla is None or not shape.mla.mtp_layers or hf_ref_dir is None:
        return None
    try:
        ref_config = load_hf_config(Path(hf_ref_dir))
        source = dequantizing_source(SafetensorsSource(hf_ref_dir), ref_config, dtype)
    except (OSError, ValueError):
        return None
    names = [n for n in source.names() if spec.is_mtp(n, shape)]
    if not names:
        return None
    entries = [(n, dtype if source.dtype(n).is_floating_point else source.dtype(n),
                tuple(source.meta(n).shape)) for n in names]
    return _MtpTensors(source, entries, bool(getattr(source, "scales", None)))


def _check_reference(meta: CheckpointMetadata, ref_dir: Path) -> None:
    ref = load_hf_config(ref_dir)
    arch = (ref.get("architectures") or [None])[0]
    diffs = [f"architecture {meta.architecture} vs {arch}"] if arch != meta.architecture else []
    diffs += [f"{k} {meta.hf_config.get(k)} vs {ref.get(k)}" for k in _SHAPE_KEYS
              if k in ref and meta.hf_config.get(k) != ref.get(k)]
    if diffs:
        raise CheckpointError(
            f"reference {ref_dir} is a different model than the checkpoint ({'; '.join(diffs)}); "
            "pass the HF directory the checkpoint was converted from"
        )


def tokenizer_size(ref_dir: Path) -> Optional[int]:
    """Ids a tokenizer in ``ref_dir`` can produce (its largest id + 1), or None without one.

    Read from ``tokenizer.json`` (base vocabulary and added tokens) when present, else through
    ``transformers`` (e.g. a sentencepiece-only tokenizer).
    """
    path = ref_dir / "tokenizer.json"
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = (data.get("model") or {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        ids += [t["id"] for t in data.get("added_tokens") or []]
        return max(ids) + 1 if ids else None
    if not any((ref_dir / n).exists() for n in ("tokenizer_config.json", "tokenizer.model",
                                                  "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(ref_dir)))


def _check_reference_tokenizer(meta: CheckpointMetadata, ref_dir: Path) -> None:
    """A tokenizer that can produce ids past the embedding rows would make the exported model
    index out of range; a smaller one is fine (the extra rows are padding)."""
    size = tokenizer_size(ref_dir)
    rows = int(meta.hf_config["vocab_size"])
    if size is not None and size > rows:
        raise CheckpointError(
            f"the tokenizer in {ref_dir} has {size} tokens but the model has only {rows} "
            f"embedding rows (vocab_size {rows}): ids {rows}..{size - 1} would index past the "
            "embedding. Pass the HF directory whose tokenizer the model was trained with, or "
            "resize the model's embeddings first"
        )


def _copy_reference_files(ref_dir: Path, out: Path) -> list[str]:
    """Tokenizer, generation config, chat template... everything but weights and config.json."""
    copied = []
    for path in sorted(ref_dir.iterdir()):
        if (not path.is_file() or path.name == "config.json" or path.name in WEIGHT_INDEX_NAMES
                or path.name.endswith(WEIGHT_SUFFIXES) or path.name.startswith(".")):
            continue
        shutil.copy2(path, out / path.name)
        copied.append(path.name)
    return copied


def export_megatron_to_hf(source: "str | Path | CheckpointReader", out_dir: "str | Path",
                          hf_ref_dir: "str | Path | None" = None,
                          options: Optional[ExportOptions] = None) -> Path:
    """``source``: a checkpoint directory, or a reader of one (a LoRA run's reader from
    ``megatron.sft.lora.open_checkpoint`` exports the merged model)."""
    opts = options or ExportOptions()
    out_dir = Path(out_dir)
    reader = (source if isinstance(source, CheckpointReader)
              else CheckpointReader(source, opts.iteration, verify=opts.verify))
    if hf_ref_dir is not None:
        _check_reference(reader.meta, Path(hf_ref_dir))
        _check_reference_tokenizer(reader.meta, Path(hf_ref_dir))
    check_output_separate(out_dir, "--save-dir", {**reader.input_dirs(),
                                                  "--hf-reference": hf_ref_dir})
    with exclusive_output(out_dir, "export"):
        check_output_dir(out_dir, opts.force)
        return _export_locked(reader, out_dir, hf_ref_dir, opts)


def _export_locked(reader: CheckpointReader, out_dir: Path, hf_ref_dir: "str | Path | None",
                   opts: ExportOptions) -> Path:
    entries = reader.check_coverage()
    fused = fused_export(reader.spec, reader.shape)  # GPT-OSS: experts as [E, ...] tensors
    if fused is not None:
        entries = fused.entries(entries)
    cast_to = opts.dtype
    if cast_to is not None:
        entries = [(n, cast_to if d.is_floating_point else d, s) for n, d, s in entries]
    config = dict(reader.meta.hf_config)
    mtp = mtp_tensors(config, hf_ref_dir, cast_to or getattr(torch, reader.meta.params_dtype))
    if mtp is not None:
        entries += mtp.entries
        opts.log(f"note: the multi-token-prediction layer(s) ({len(mtp.entries)} tensors) are "
                 f"put back unchanged from {hf_ref_dir}" + (" (dequantised)" if mtp.dequantised
                                                           else ""))
    elif config.get("num_nextn_predict_layers"):
        opts.log(f"warning: the checkpoint's HF config has num_nextn_predict_layers="
                 f"{config['num_nextn_predict_layers']} but no HF reference holding those "
                 "layers was given: the export has none, and its config says 0")
        config["num_nextn_predict_layers"] = 0
    if config.pop("quantization_config", None) is not None:
        opts.log(f"note: the weights are written in {dtype_name(cast_to or entries[0][1])}, "
                 "not re-quantised: quantization_config is removed from config.json")
    shards = plan_shards(entries, parse_size(opts.max_shard_size))
    files = shard_file_names(len(shards))
    needed = sum(int(torch.Size(shape).numel()) * torch.empty((), dtype=d).element_size()
                 for _, d, shape in entries)
    check_free_space(out_dir.parent, needed, f"the HF model {out_dir.name}")
    bar = tqdm(total=len(entries), unit="tensor", desc="export", disable=not opts.progress)

    def write(staging: Path) -> None:
        stream = reader.tensors() if fused is None else fused.stream(reader.tensors())
        stream = itertools.chain(stream, mtp.tensors() if mtp else ())
        weight_map, total = {}, 0
        for fname, shard in zip(files, shards):
            writer = StreamingShardWriter(staging / fname, shard, {"format": "pt"})
            for name, _, _ in shard:
                got_name, tensor = next(stream)
                refuse_non_finite(got_name, tensor, f"checkpoint {reader.iter_dir} holds a "
                                  "diverged or damaged model; export an earlier iteration")
                if cast_to is not None and tensor.is_floating_point():
                    tensor = tensor.to(cast_to)
                writer.write(got_name, tensor)
                weight_map[got_name] = fname
                bar.update(1)
            writer.close()
            total += writer.nbytes
        if len(files) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2)
                                                                  + "\n")
        if hf_ref_dir is not None:
            _copy_reference_files(Path(hf_ref_dir), staging)
        out_dtype = dtype_name(cast_to or entries[0][1])
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = out_dtype
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True)
                                             + "\n")

    try:
        with disk_full_guard(out_dir.parent, needed, f"the HF model {out_dir.name}"):
            write_staged(out_dir, write)
    finally:
        bar.close()
    return out_dir
