"""Read a megatron-core indexed dataset (``.idx`` + ``.bin``) with numpy alone.

Why not megatron-core's ``IndexedDataset``: importing it pulls in torch (about 5 s); a preview
tool (``tools/inspect_sft_data.py``) should answer in well under that. Training keeps using
``IndexedDataset`` (``sft_dataset.open_pair``); a test checks both read the same samples.

The ``.idx`` layout (megatron-core's ``_IndexWriter``, version 1), little-endian::

    b"MMIDIDX\\x00\\x00"     9 bytes
    version              u64, always 1
    dtype code           u8   1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    sequence count S     u64
    document count D     u64
    sequence lengths     int32[S]
    sequence pointers    int64[S]   byte offsets into the .bin
    document indices     int64[D]
    (sequence modes      int8[S], multimodal datasets only: not read)

Example: 2 samples of 3 and 2 uint16 tokens -> lengths ``[3, 2]``, pointers ``[0, 6]``, a
10-byte ``.bin``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from megatron.sft.data.indexed_writer import LOSS_MASK_SUFFIX, TEXT_SUFFIX

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
          7: np.float32, 8: np.uint16}


@dataclass(frozen=True)
class IndexFile:
    """The parsed ``.idx`` (the attributes ``validation.check_bin_size`` reads)."""

    dtype: type
    sequence_lengths: np.ndarray
    sequence_pointers: np.ndarray
    document_indices: np.ndarray


def read_index(idx_path: str) -> IndexFile:
    """Parse ``idx_path``; a file that is not a version-1 megatron-core index is a ``ValueError``."""
    with open(idx_path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != INDEX_HEADER:
        raise ValueError(f"{idx_path} is not a megatron-core index file (no MMIDIDX header); "
                         "re-run the pre-tokenization (scripts/data/tokenize_dataset.sh)")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[9:34])
    if version != 1 or code not in DTYPES:
        raise ValueError(f"{idx_path}: index version {version}, dtype code {code}: only version 1 "
                         f"with codes {sorted(DTYPES)} is known")
    buffer = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(buffer, np.int32, sequences, 34)
    pointers = np.frombuffer(buffer, np.int64, sequences, 34 + lengths.nbytes)
    docs = np.frombuffer(buffer, np.int64, documents, 34 + lengths.nbytes + pointers.nbytes)
    return IndexFile(DTYPES[code], lengths, pointers, docs)


class IndexedReader:
    """Samples of one ``path_prefix.{idx,bin}``: ``reader[i]`` is sample ``i``'s array."""

    def __init__(self, path_prefix: str):
        from megatron.sft.data.validation import check_bin_size

        self.path_prefix = path_prefix
        self.index = read_index(path_prefix + ".idx")
        check_bin_size(self, path_prefix)  # a truncated or mismatched .bin names both files
        size = os.path.getsize(path_prefix + ".bin")
        self._bin = (np.memmap(path_prefix + ".bin", mode="r", dtype=self.index.dtype) if size
                     else np.zeros(0, self.index.dtype))

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self.index.sequence_lengths

    def __len__(self) -> int:
        return len(self.index.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.index.sequence_pointers[i]) // np.dtype(self.index.dtype).itemsize
        return np.asarray(self._bin[start:start + int(self.index.sequence_lengths[i])])

    def all_tokens(self) -> np.ndarray:
        """Every sample back to back (a memory map: nothing is read until used)."""
        return self._bin


def strip_suffix(prefix: str) -> str:
    """``x_text_document`` or ``x_loss_mask_document`` -> ``x``; anything else unchanged."""
    for suffix in (TEXT_SUFFIX, LOSS_MASK_SUFFIX):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def incomplete_dataset(prefix: str) -> str | None:
    """Why the files of ``prefix`` are a partial dataset, or ``None``: one of a ``.bin``/``.idx``
    pair without the other, or no loss-mask pair although ``PREFIX_stats.json`` (written by our
    pre-tokenizer, which always writes masks) is there. Only data written without masks (e.g. by
    Megatron-LM's ``preprocess_data.py``) trains on every token; a copy that lost a mask file
    must not silently do so.

    Example: ``ds_loss_mask_document.bin`` without its ``.idx`` -> ``"ds_loss_mask_document.idx
    is missing, but ds_loss_mask_document.bin is there: ..."``.
    """
    for suffix in (TEXT_SUFFIX, LOSS_MASK_SUFFIX):
        have = {ext: os.path.exists(prefix + suffix + ext) for ext in (".bin", ".idx")}
        if have[".bin"] != have[".idx"]:
            missing, present = (".idx", ".bin") if have[".bin"] else (".bin", ".idx")
            return (f"{prefix}{suffix}{missing} is missing, but {prefix}{suffix}{present} is "
                    "there: the dataset is incomplete (a copy that stopped part-way?). Copy the "
                    "missing file too, or re-run the pre-tokenization")
    masks = os.path.exists(prefix + LOSS_MASK_SUFFIX + ".idx")
    if not masks and os.path.exists(prefix + "_stats.json"):
        return (f"{prefix}{LOSS_MASK_SUFFIX}.bin/.idx are missing, but {prefix}_stats.json is "
                "there: the pre-tokenizer wrote loss masks for this dataset, and without them "
                "every token would be learned. Copy the loss-mask files too, or re-run the "
                "pre-tokenization")
    return None


def open_indexed_pair(prefix: str) -> tuple[IndexedReader, IndexedReader | None]:
    """``sft_dataset.open_pair`` without torch: (tokens, loss mask or None), lengths checked."""
    prefix = strip_suffix(prefix)
    text_prefix, mask_prefix = prefix + TEXT_SUFFIX, prefix + LOSS_MASK_SUFFIX
    if not (os.path.exists(text_prefix + ".idx") or os.path.exists(text_prefix + ".bin")):
        raise FileNotFoundError(
            f"no SFT dataset at {prefix!r}: expected {text_prefix}.bin/.idx and "
            f"{mask_prefix}.bin/.idx (run scripts/data/tokenize_dataset.sh first, or give a raw "
            "file with --input)."
        )
    problem = incomplete_dataset(prefix)
    if problem is not None:
        raise FileNotFoundError(problem)
    text = IndexedReader(text_prefix)
    if not os.path.exists(mask_prefix + ".idx"):
        return text, None
    mask = IndexedReader(mask_prefix)
    if not np.array_equal(text.sequence_lengths, mask.sequence_lengths):
        raise ValueError(f"{prefix}: token and loss-mask datasets have different sequence lengths; "
                         "re-run the preprocessing (the pair must come from the same run).")
    return text, mask
