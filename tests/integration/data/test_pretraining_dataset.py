"""Continued pretraining: a text-only indexed dataset (no loss-mask file) trains on every token;
long documents are cut so each next-token prediction is made exactly once."""

import numpy as np

from megatron.sft.data.sft_dataset import SFTDataset, SFTDatasetConfig, split_documents


def test_split_documents_example():
    doc, start, pos = split_documents(np.array([7]), np.array([9]), 4)
    assert doc.tolist() == [7, 7, 7] and start.tolist() == [0, 4, 8] and pos.tolist() == [4, 4, 1]
    doc, start, pos = split_documents(np.array([0, 1]), np.array([3, 8]), 4)
    assert doc.tolist() == [0, 1, 1] and start.tolist() == [0, 0, 4] and pos.tolist() == [3, 4, 4]


def test_text_only_dataset_covers_every_prediction_once(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 1000, size=n).astype(np.int32) for n in (5, 40, 17, 2, 64, 9)]
    prefix = str(tmp_path / "cpt_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(prefix + ".idx")

    ds = SFTDataset(SFTDatasetConfig(data_path=str(tmp_path / "cpt"), seq_length=16), str(tmp_path / "cpt"))
    assert ds.pretraining and ds.skipped_too_long == 0
    expected = sorted((int(a), int(b)) for d in docs for a, b in zip(d[:-1], d[1:]))
    got = []
    for row in range(len(ds)):
        item = ds[row]
        mask = item["loss_mask"].numpy() > 0
        got += list(zip(item["tokens"].numpy()[mask].tolist(), item["labels"].numpy()[mask].tolist()))
        assert mask.sum() <= 16
    assert sorted(got) == expected
