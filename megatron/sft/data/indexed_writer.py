"""Write the token / loss-mask pair of megatron-core indexed datasets, atomically.

Files for ``prefix = "out/Tokenized-x-tok-4096"``::

    out/Tokenized-x-tok-4096_text_document.bin/.idx       token ids, dtype from vocab size
    out/Tokenized-x-tok-4096_loss_mask_document.bin/.idx  uint8, 1 = learn this token

Both have one document of one sequence per sample, so sequence ``i`` of each is sample ``i``.
Everything is written under ``*.tmp-<host>-<pid>`` names and renamed only in ``commit()``, ``.bin``
first and ``.idx`` last: an interrupted run never leaves a pair that ``IndexedDataset`` would open,
and the temp files of a run that was killed are recognised and removed by the next run on the
same prefix (``runtime.locks.remove_stale_temp_files``).

The files are megatron-core's ``IndexedDataset`` format (``MMIDIDX``), written here without
importing megatron-core (which pulls in torch and ``torch.compile``: seconds of start-up for a
tool that needs neither). Byte for byte what ``IndexedDatasetBuilder.add_document(sample, [len])``
per sample and ``finalize`` write; a test compares both and reads ours back with
``megatron.core.datasets.indexed_dataset.IndexedDataset``::

    .bin   the samples' values back to back, in the dataset's dtype
    .idx   b"MMIDIDX\\x00\\x00" | <Q 1 (version) | <B dtype code | <Q sequences N | <Q documents N+1
           | int32 lengths[N] | int64 byte offsets[N] | int64 document indices [0, 1, ..., N]

Example: lengths ``[3, 2]`` of uint16 tokens -> offsets ``[0, 6]``, document indices ``[0, 1, 2]``.
Per-sample bookkeeping is a compact ``array`` (8 bytes per sample), not Python lists.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path

import numpy as np

from megatron.sft.runtime.locks import temp_name

TEXT_SUFFIX = "_text_document"
LOSS_MASK_SUFFIX = "_loss_mask_document"
#: every file of a dataset written by the pre-tokenizer, after its prefix
DATASET_SUFFIXES = (TEXT_SUFFIX + ".bin", TEXT_SUFFIX + ".idx", LOSS_MASK_SUFFIX + ".bin",
                    LOSS_MASK_SUFFIX + ".idx", "_stats.json")


_INDEX_HEADER = b"MMIDIDX\x00\x00"
#: megatron-core's ``DType`` codes (``indexed_dataset.DType``), for the dtypes we write
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
                np.float32: 7, np.uint16: 8}


def optimal_token_dtype(vocab_size: int | None) -> type:
    """megatron-core's ``DType.optimal_dtype``: uint16 below 65,500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class _IndexedFileWriter:
    """One ``.bin`` being appended to, and what its ``.idx`` will hold."""

    def __init__(self, bin_path: str, dtype: type):
        self.dtype = dtype
        self.data_file = open(bin_path, "wb")
        self.sequence_lengths = array("q")

    def write(self, values: np.ndarray, lengths: np.ndarray) -> None:
        self.data_file.write(np.asarray(values).astype(self.dtype, copy=False).tobytes(order="C"))
        self.sequence_lengths.frombytes(lengths.tobytes())

    def finalize(self, idx_path: str) -> None:
        self.data_file.close()
        lengths = np.frombuffer(self.sequence_lengths, dtype=np.int64)
        n = len(lengths)
        pointers = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1] * np.dtype(self.dtype).itemsize, out=pointers[1:])
        with open(idx_path, "wb") as f:
            f.write(_INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", _DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", n) + struct.pack("<Q", n + 1))
            f.write(lengths.astype(np.int32).tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.arange(n + 1, dtype=np.int64).tobytes(order="C"))


def pair_prefixes(prefix: str) -> tuple[str, str]:
    """``prefix`` -> (text dataset prefix, loss-mask dataset prefix), as megatron-core opens them."""
    return prefix + TEXT_SUFFIX, prefix + LOSS_MASK_SUFFIX


def existing_dataset_files(prefix: str) -> list[str]:
    """The files of a dataset already at ``prefix`` (``[]`` when there is none)."""
    return [prefix + suffix for suffix in DATASET_SUFFIXES if os.path.lexists(prefix + suffix)]


class IndexedPairWriter:
    """Append ``(ids, mask)`` samples; ``commit()`` publishes, ``abort()`` removes all traces."""

    def __init__(self, prefix: str, vocab_size: int):
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self._final: list[tuple[str, str]] = []
        self._temps: list[str] = []
        self._builders: list[tuple[_IndexedFileWriter, str]] = []
        self.token_dtype = optimal_token_dtype(vocab_size)
        for name, dtype in zip(pair_prefixes(prefix), (self.token_dtype, np.uint8)):
            bin_tmp, idx_tmp = temp_name(name + ".bin"), temp_name(name + ".idx")
            self._temps += [bin_tmp, idx_tmp]  # before open: abort() removes what did open
            self._builders.append((_IndexedFileWriter(bin_tmp, dtype), idx_tmp))
            self._final += [(bin_tmp, name + ".bin"), (idx_tmp, name + ".idx")]
        self._extra: list[tuple[str, str]] = []
        self.num_samples = 0
        self._done = False

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """Append one sample."""
        self.add_batch(ids, mask, np.array([len(ids)], dtype=np.int64))

    def add_batch(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` samples given back to back: lengths ``[3, 2]`` -> ids[0:3], ids[3:5].

        Byte-identical to one ``IndexedDatasetBuilder.add_document(sample, [len])`` per sample,
        in two writes instead of two per sample.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        total = int(lengths.sum())
        if len(ids) != len(mask) or len(ids) != total:
            raise ValueError(f"ids, mask and sum(lengths) differ: {len(ids)}, {len(mask)}, {total}")
        for (builder, _), values in zip(self._builders, (ids, mask)):
            builder.write(values, lengths)
        self.num_samples += len(lengths)

    def publish_with(self, tmp: str, final: str) -> None:
        """Also rename the finished file ``tmp`` to ``final`` in ``commit()``, after the pair
        (the stats JSON); ``abort()`` removes it."""
        self._temps.append(tmp)
        self._extra.append((tmp, final))

    def commit(self) -> None:
        for builder, idx_tmp in self._builders:
            builder.finalize(idx_tmp)
        bins = [pair for pair in self._final if pair[1].endswith(".bin")]
        idxs = [pair for pair in self._final if pair[1].endswith(".idx")]
        for tmp, final in bins + idxs + self._extra:
            os.replace(tmp, final)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        for builder, _ in self._builders:
            try:
                builder.data_file.close()
            except OSError:  # a full disk fails the final flush too; the file goes anyway
                pass
        for tmp in self._temps:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._done = True

    def __enter__(self) -> "IndexedPairWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
