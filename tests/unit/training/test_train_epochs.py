"""--train-epochs sizes the training set after counting one epoch, without building it twice:
extending a one-epoch dataset gives exactly the rows of a dataset built at that size."""

import numpy as np

from megatron.sft.data.sft_dataset import SFTDataset, SFTDatasetConfig


def test_extending_one_epoch_equals_building_at_size(sft_assets):
    cfg = SFTDatasetConfig(data_path=sft_assets["data"], seq_length=128, seed=3)
    grown = SFTDataset(cfg, sft_assets["data"])
    one_epoch = grown.epoch_rows
    assert len(grown) == one_epoch and grown.epochs == 1
    wanted = int(2.5 * one_epoch)
    grown.extend_to(wanted)
    direct = SFTDataset(cfg, sft_assets["data"], num_samples=wanted)
    assert len(grown) == len(direct) == wanted and grown.epochs == direct.epochs == 3
    for row in range(wanted):
        assert np.array_equal(grown.sample_ids(row), direct.sample_ids(row))
        assert np.array_equal(grown.document_lengths(row), direct.document_lengths(row))
    # Each epoch is shuffled and packed anew, and covers every sample once.
    first = [tuple(grown.sample_ids(r)) for r in range(one_epoch)]
    second = [tuple(grown.sample_ids(r)) for r in range(one_epoch, 2 * one_epoch)]
    assert first != second
    assert sorted(i for row in first for i in row) == sorted(i for row in second for i in row)
    assert grown[wanted - 1]["tokens"].shape == (128,)
