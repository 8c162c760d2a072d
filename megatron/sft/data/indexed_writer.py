"""Write the token / loss-mask pair of megatron-core indexed datasets, atomically.

Files for ``prefix = "out/Tokenized-x-tok-4096"``::

    out/Tokenized-x-tok-4096_text_document.bin/.idx       token ids, dtype from vocab size
    out/Tokenized-x-tok-4096_loss_mask_document.bin/.idx  uint8, 1 = learn this token

Both have one document of one sequence per sample, so sequence ``i`` of each is sample ``i``.
Everything is written under ``*.tmp-<host>-<pid>`` names and renamed only in ``commit()``, ``.bin``
first and ``.idx`` last: an interrupted run never leaves a pair that ``IndexedDataset`` would open,
and the temp files of a run that was killed are recognised and removed by the next run on the
same prefix (``runtime.locks.remove_stale_temp_files``).

The builder's per-sequence bookkeeping uses compact ``array`` buffers instead of Python lists,
so memory grows by ~12 bytes per sample, not ~70.
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path

import numpy as np

from megatron.sft.runtime.locks import temp_name

TEXT_SUFFIX = "_text_document"
LOSS_MASK_SUFFIX = "_loss_mask_document"
#: every file of a dataset written by the pre-tokenizer, after its prefix
DATASET_SUFFIXES = (TEXT_SUFFIX + ".bin", TEXT_SUFFIX + ".idx", LOSS_MASK_SUFFIX + ".bin",
                    LOSS_MASK_SUFFIX + ".idx", "_stats.json")


def pair_prefixes(prefix: str) -> tuple[str, str]:
    """``prefix`` -> (text dataset prefix, loss-mask dataset prefix), as megatron-core opens them."""
    return prefix + TEXT_SUFFIX, prefix + LOSS_MASK_SUFFIX


def existing_dataset_files(prefix: str) -> list[str]:
    """The files of a dataset already at ``prefix`` (``[]`` when there is none)."""
    return [prefix + suffix for suffix in DATASET_SUFFIXES if os.path.lexists(prefix + suffix)]


class IndexedPairWriter:
    """Append ``(ids, mask)`` samples; ``commit()`` publishes, ``abort()`` removes all traces."""

    def __init__(self, prefix: str, vocab_size: int):
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self._final: list[tuple[str, str]] = []
        self._temps: list[str] = []
        self._builders = []
        self.token_dtype = DType.optimal_dtype(vocab_size)
        for name, dtype in zip(pair_prefixes(prefix), (self.token_dtype, np.uint8)):
            bin_tmp, idx_tmp = temp_name(name + ".bin"), temp_name(name + ".idx")
            builder = IndexedDatasetBuilder(bin_tmp, dtype=dtype)
            builder.sequence_lengths = array("q")
            builder.document_indices = array("q", [0])
            self._builders.append((builder, idx_tmp))
            self._temps += [bin_tmp, idx_tmp]
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
            builder.data_file.write(np.asarray(values).astype(builder.dtype, copy=False).tobytes(order="C"))
            first = len(builder.sequence_lengths) + 1
            builder.sequence_lengths.frombytes(lengths.tobytes())
            builder.document_indices.frombytes(np.arange(first, first + len(lengths), dtype=np.int64).tobytes())
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
