"""Training-side dataset over a pre-tokenised (tokens, loss mask) pair: packed or padded rows.

Each item is a dict with the keys megatron users know::

    tokens, labels, position_ids   int64 [seq_length]
    loss_mask                      float32 [seq_length]  (aligned to labels; padding is 0)
    cu_seqlens                     int32 [n_segments + 1] (varies per row; see ``collate_sft``)

How rows are built (``packing.py`` holds the pure maths):

- samples longer than ``seq_length + 1`` tokens cannot fit and are skipped (``skipped_too_long``);
- epoch ``e`` shuffles the samples with ``seed`` and ``e`` and packs them best-fit-decreasing in
  windows of ``pack_window`` samples; more epochs are appended until ``num_samples`` rows exist;
- ``packing=False`` gives one sample per row, padded (the baseline packing is compared with).

Example::

    train, valid, _ = build_sft_datasets(SFTDatasetConfig(
        data_path="assets/data/X/Tokenized-X-tok-4096", seq_length=4096, split="98,2"))
    batch = collate_sft([train[0], train[1]])    # batch["tokens"].shape == (2, 4096)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from megatron.sft.data.indexed_reader import incomplete_dataset
from megatron.sft.data.indexed_writer import LOSS_MASK_SUFFIX, TEXT_SUFFIX
from megatron.sft.data.packing import assemble_pack, pack_best_fit, packing_efficiency
from megatron.sft.data.validation import VocabularyGuard, check_bin_size


@dataclass
class SFTDatasetConfig:
    """One config for the training data concern (flag names follow Megatron-LM)."""

    data_path: str
    """Prefix written by ``tools/preprocess_data_sft.py`` (with or without ``_text_document``)."""
    seq_length: int
    """Positions per row (``--seq-length``)."""
    seed: int = 1234
    """Shuffle/packing seed (``--seed``); the same seed gives the same rows."""
    packing: bool = True
    """Pack several samples per row; False pads one sample per row."""
    pack_window: int = 4096
    """Samples per best-fit-decreasing window: larger packs tighter, smaller mixes more locally."""
    split: str = "98,2,0"
    """Train,valid,test weights over samples (``--split``); ignored with ``valid_data_path``."""
    valid_data_path: str | None = None
    """Separate validation prefix; then all of ``data_path`` is training data."""
    num_samples: int | None = None
    """Training rows wanted (e.g. train_iters * global_batch_size); None = one epoch."""
    pad_token_id: int = 0
    """Id written into padding positions (their loss mask is 0, so any id works)."""

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"--seq-length must be positive, got {self.seq_length}.")
        if self.pack_window < 1:
            raise ValueError(f"pack_window must be >= 1, got {self.pack_window}.")
        weights = parse_split(self.split)
        if weights[0] <= 0:
            raise ValueError(f"--split {self.split!r} gives no training data; e.g. use '98,2,0'.")


def parse_split(split: str) -> list[float]:
    """``"98,2"`` -> ``[0.98, 0.02, 0.0]`` (normalised train/valid/test weights)."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split {split!r} must be comma-separated numbers, e.g. '98,2,0'.") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {split!r} needs 1-3 non-negative weights with a positive sum.")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def _strip_suffix(prefix: str) -> str:
    for suffix in (TEXT_SUFFIX, LOSS_MASK_SUFFIX):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def open_pair(prefix: str):
    """Open ``<prefix>_text_document`` and ``<prefix>_loss_mask_document`` and check they match.

    A text dataset without a loss-mask file (e.g. from Megatron-LM's ``preprocess_data.py``) is
    continued-pretraining data: the mask is ``None`` and every token is learned.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = _strip_suffix(prefix)
    if not any(os.path.exists(prefix + TEXT_SUFFIX + ext) for ext in (".bin", ".idx")):
        raise FileNotFoundError(
            f"no SFT dataset at {prefix!r}: expected {prefix}{TEXT_SUFFIX}.bin/.idx and "
            f"{prefix}{LOSS_MASK_SUFFIX}.bin/.idx (run tools/preprocess_data_sft.py first)."
        )
    problem = incomplete_dataset(prefix)  # a lost mask file must not mean "learn every token"
    if problem is not None:
        raise FileNotFoundError(problem)
    text = IndexedDataset(prefix + TEXT_SUFFIX)
    check_bin_size(text, prefix + TEXT_SUFFIX)
    if not IndexedDataset.exists(prefix + LOSS_MASK_SUFFIX):
        return text, None
    mask = IndexedDataset(prefix + LOSS_MASK_SUFFIX)
    check_bin_size(mask, prefix + LOSS_MASK_SUFFIX)
    if not np.array_equal(text.sequence_lengths, mask.sequence_lengths):
        raise ValueError(
            f"{prefix}: token and loss-mask datasets have different sequence lengths; "
            "re-run the preprocessing (the pair must come from the same run)."
        )
    return text, mask


class SFTDataset(torch.utils.data.Dataset):
    """Rows of ``seq_length`` from the samples ``indices`` of one (tokens, loss mask) pair."""

    def __init__(self, config: SFTDatasetConfig, prefix: str, indices: np.ndarray | None = None,
                 name: str = "train", num_samples: int | None = None):
        self.config, self.name = config, name
        self.prefix = _strip_suffix(prefix)
        self.text, self.mask = open_pair(prefix)
        #: set by the trainer: checks each sample's ids against the model's vocabulary
        self.vocab_guard: VocabularyGuard | None = None
        all_lengths = self.text.sequence_lengths.astype(np.int64)
        indices = np.arange(len(all_lengths)) if indices is None else np.asarray(indices, np.int64)
        positions = all_lengths[indices] - 1  # slots a sample takes after the shift
        self.pretraining = self.mask is None
        if self.pretraining:
            # Documents are cut into pieces of seq_length positions (one token of overlap, so no
            # prediction is lost at a cut); pieces are packed like SFT samples.
            indices, starts, positions = split_documents(indices, positions, config.seq_length)
        else:
            starts = np.zeros_like(indices)
        fits = (positions >= 1) & (positions <= config.seq_length)
        self.skipped_too_long = int((~fits).sum())
        #: samples of this split longer than the row (never trained on; counted at start)
        self.too_long = indices[positions > config.seq_length] if not self.pretraining \
            else indices[:0]
        self.indices, self.positions = indices[fits], positions[fits]
        self.starts = starts[fits]
        if self.indices.size == 0:
            raise ValueError(
                f"{name} split of {prefix!r} has no sample of 2..{config.seq_length + 1} tokens "
                f"({self.skipped_too_long} skipped); raise --seq-length or check the split."
            )
        self._packed: list[np.ndarray] = []  # every row packed so far, epoch after epoch
        self.epochs = 0
        self.epoch_rows = 0
        self.extend_to(num_samples)

    def extend_to(self, num_samples: int | None) -> None:
        """Hold exactly ``num_samples`` rows (one epoch when ``None``). Each further epoch is
        packed with its own shuffle; training for ``--train-epochs`` counts one epoch's rows,
        then extends the same dataset instead of building it twice."""
        while not self._packed or (num_samples is not None and len(self._packed) < num_samples):
            epoch = self._epoch_rows(self.epochs)
            self.epoch_rows = self.epoch_rows or len(epoch)
            self._packed.extend(epoch)
            self.epochs += 1
        rows = self._packed if num_samples is None else self._packed[:num_samples]
        self._row_offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
        self._row_items = np.concatenate(rows)  # positions into self.indices
        self.efficiency = packing_efficiency(
            [int(self.positions[r].sum()) for r in rows], self.config.seq_length
        )

    def _epoch_rows(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.config.seed, epoch])
        if not self.config.packing:
            return [np.array([i]) for i in rng.permutation(self.indices.size)]
        return pack_best_fit(self.positions, self.config.seq_length, self.config.pack_window, rng)

    def __len__(self) -> int:
        return len(self._row_offsets) - 1

    def sample_ids(self, row: int) -> np.ndarray:
        """Document indices (into the indexed dataset) packed in ``row``."""
        items = self._row_items[self._row_offsets[row]:self._row_offsets[row + 1]]
        return self.indices[items]

    def document_lengths(self, row: int) -> np.ndarray:
        """Positions (tokens after the shift) of each sample packed in ``row``; attention FLOPs
        grow with the sum of their squares, not with ``seq_length`` squared."""
        return self.positions[self._row_items[self._row_offsets[row]:self._row_offsets[row + 1]]]

    def _sample(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        doc = int(self.indices[item])
        if not self.pretraining:
            ids, mask = self.text[doc], self.mask[doc]
        else:
            ids = self.text.get(doc, offset=int(self.starts[item]),
                                length=int(self.positions[item]) + 1)
            mask = np.ones(len(ids), np.uint8)
        if self.vocab_guard is not None:
            self.vocab_guard.check(ids, doc)
        return ids, mask

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        items = self._row_items[self._row_offsets[row]:self._row_offsets[row + 1]]
        samples = [self._sample(int(i)) for i in items]
        arrays = assemble_pack(samples, self.config.seq_length, self.config.pad_token_id)
        return {key: torch.from_numpy(value) for key, value in arrays.items()}


def split_documents(docs: np.ndarray, positions: np.ndarray, seq_length: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut documents into pieces of at most ``seq_length`` positions (pure).

    Returns ``(doc, start_token, positions)`` per piece; piece ``j`` of a document reads tokens
    ``[j*S, j*S + positions + 1)``, so consecutive pieces share one token and every next-token
    prediction of the document is made exactly once. Example, S=4, one document of 10 tokens
    (9 positions): starts ``[0, 4, 8]``, positions ``[4, 4, 1]``.
    """
    counts = np.maximum(1, -(-positions // seq_length))
    doc = np.repeat(docs, counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    start = within * seq_length
    pos = np.minimum(seq_length, np.repeat(positions, counts) - start)
    return doc.astype(np.int64), start.astype(np.int64), pos.astype(np.int64)


def build_sft_datasets(config: SFTDatasetConfig, train_samples: int | None = None):
    """``(train, valid, test)`` datasets; valid/test are None when their split weight is 0."""
    train_samples = train_samples if train_samples is not None else config.num_samples
    if config.valid_data_path:
        train = SFTDataset(config, config.data_path, name="train", num_samples=train_samples)
        return train, SFTDataset(config, config.valid_data_path, name="valid"), None
    text, _ = open_pair(config.data_path)
    n = len(text)
    order = np.random.default_rng([config.seed, 999]).permutation(n)
    weights = parse_split(config.split)
    bounds = np.round(np.cumsum([0.0] + weights) * n).astype(np.int64)
    parts = [np.sort(order[bounds[i]:bounds[i + 1]]) for i in range(3)]
    train = SFTDataset(config, config.data_path, parts[0], "train", train_samples)
    valid = SFTDataset(config, config.data_path, parts[1], "valid") if parts[1].size else None
    test = SFTDataset(config, config.data_path, parts[2], "test") if parts[2].size else None
    return train, valid, test


def collate_sft(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows; ``cu_seqlens`` rows are right-padded with -1 to the longest one.

    Example: ``[0, 3, 7]`` and ``[0, 7]`` -> ``[[0, 3, 7], [0, 7, -1]]``; the valid part of row
    ``b`` is ``cu_seqlens[b][cu_seqlens[b] >= 0]``.
    """
    out = {k: torch.stack([row[k] for row in batch]) for k in batch[0] if k != "cu_seqlens"}
    width = max(len(row["cu_seqlens"]) for row in batch)
    cu = torch.full((len(batch), width), -1, dtype=torch.int32)
    for b, row in enumerate(batch):
        cu[b, : len(row["cu_seqlens"])] = row["cu_seqlens"]
    out["cu_seqlens"] = cu
    return out
