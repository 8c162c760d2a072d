"""Write the token / loss-mask pair of megatron-core indexed datasets, atomically.

Files for ``prefix = "out/Tokenized-x-tok-4096"``::

    out/Tokenized-x-tok-4096_text_document.bin/.idx       token ids, dtype from vocab size
    out/Tokenized-x-tok-4096_loss_mask_document.bin/.idx  uint8, 1 = learn this token

Both have one document of one sequence per sample, so sequence ``i`` of each is sample ``i``.
Everything is written under ``*.tmp-<pid>`` names and renamed only in ``commit()``, ``.bin`` first
and ``.idx`` last: an interrupted run never leaves a pair that ``IndexedDataset`` would open.

The builder's per-sequence bookkeeping uses compact ``array`` buffers instead of Python lists,
so memory grows by ~12 bytes per sample, not ~70.
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path

import numpy as np

TEXT_SUFFIX = "_text_document"
LOSS_MASK_SUFFIX = "_loss_mask_document"


def pair_prefixes(prefix: str) -> tuple[str, str]:
    """``prefix`` -> (text dataset prefix, loss-mask dataset prefix), as megatron-core opens them."""
    return prefix + TEXT_SUFFIX, prefix + LOSS_MASK_SUFFIX


class IndexedPairWriter:
    """Append ``(ids, mask)`` samples; ``commit()`` publishes, ``abort()`` removes all traces."""

    def __init__(self, prefix: str, vocab_size: int):
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        self._final: list[tuple[str, str]] = []
        self._temps: list[str] = []
        self._builders = []
        self.token_dtype = DType.optimal_dtype(vocab_size)
        for name, dtype in zip(pair_prefixes(prefix), (self.token_dtype, np.uint8)):
            bin_tmp, idx_tmp = name + ".bin" + tag, name + ".idx" + tag
            builder = IndexedDatasetBuilder(bin_tmp, dtype=dtype)
            builder.sequence_lengths = array("q")
            builder.document_indices = array("q", [0])
            self._builders.append((builder, idx_tmp))
            self._temps += [bin_tmp, idx_tmp]
            self._final += [(bin_tmp, name + ".bin"), (idx_tmp, name + ".idx")]
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

    def commit(self) -> None:
        for builder, idx_tmp in self._builders:
            builder.finalize(idx_tmp)
        bins = [pair for pair in self._final if pair[1].endswith(".bin")]
        idxs = [pair for pair in self._final if pair[1].endswith(".idx")]
        for tmp, final in bins + idxs:
            os.replace(tmp, final)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        for builder, _ in self._builders:
            builder.data_file.close()
        for tmp in self._temps:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._done = True

    def __enter__(self) -> "IndexedPairWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
