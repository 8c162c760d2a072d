"""The training-side dataset over a real pre-tokenised pair (IndexedDataset is the reference)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron.sft.data.preprocess import PreprocessConfig, preprocess
from megatron.sft.data.sft_dataset import SFTDataset, SFTDatasetConfig, build_sft_datasets, collate_sft, parse_split

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def prefix(tokenizer_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    rng = np.random.default_rng(0)
    with open(root / "d.jsonl", "w") as f:
        for i in range(120):
            n = int(rng.integers(1, 25))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Count to {n}."},
                                             {"role": "assistant", "content": " ".join(map(str, range(n)))}]}) + "\n")
    out = str(root / "pair")
    preprocess(PreprocessConfig(input=str(root / "d.jsonl"), tokenizer_model=str(tokenizer_dirs["chatml"]),
                                output_prefix=out, progress=False))
    return out


def reference(prefix):
    text, mask = IndexedDataset(prefix + "_text_document"), IndexedDataset(prefix + "_loss_mask_document")
    # copies: the arrays are views of the mmap, which closes when the datasets are collected
    return [(np.array(text[i]), np.array(mask[i])) for i in range(len(text))]


def test_packed_rows_hold_each_sample_once_intact_and_aligned(prefix):
    samples = reference(prefix)
    ds = SFTDataset(SFTDatasetConfig(data_path=prefix, seq_length=128, pack_window=64), prefix)
    seen = []
    for row in range(len(ds)):
        item = ds[row]
        assert set(item) == {"tokens", "labels", "loss_mask", "position_ids", "cu_seqlens"}
        assert item["tokens"].shape == (128,) and item["loss_mask"].dtype == torch.float32
        cu = item["cu_seqlens"].tolist()
        for k, doc in enumerate(ds.sample_ids(row)):
            ids, mask = samples[doc]
            s, e = cu[k], cu[k + 1]
            assert item["tokens"][s:e].tolist() == ids[:-1].tolist()
            assert item["labels"][s:e].tolist() == ids[1:].tolist()
            assert item["loss_mask"][s:e].tolist() == mask[1:].tolist()
            assert item["position_ids"][s:e].tolist() == list(range(e - s))
            seen.append(int(doc))
        assert not item["loss_mask"][cu[len(ds.sample_ids(row))]:].any()  # padding never learned
    assert sorted(seen) == list(range(len(samples)))
    assert ds.efficiency > 0.9


def test_deterministic_per_seed_epochs_reshuffle_and_unpacked_mode(prefix):
    config = SFTDatasetConfig(data_path=prefix, seq_length=128, seed=7)
    a, b = SFTDataset(config, prefix), SFTDataset(config, prefix)
    assert [a.sample_ids(i).tolist() for i in range(len(a))] == [b.sample_ids(i).tolist() for i in range(len(b))]
    assert torch.equal(a[3]["tokens"], b[3]["tokens"])
    other = SFTDataset(SFTDatasetConfig(data_path=prefix, seq_length=128, seed=8), prefix)
    assert [a.sample_ids(i).tolist() for i in range(len(a))] != [other.sample_ids(i).tolist() for i in range(len(other))]
    two = SFTDataset(config, prefix, num_samples=len(a) + 5)
    assert two.epochs == 2 and len(two) == len(a) + 5
    assert [two.sample_ids(i).tolist() for i in range(len(a))] == [a.sample_ids(i).tolist() for i in range(len(a))]
    assert two.sample_ids(len(a)).tolist() != a.sample_ids(0).tolist()
    flat = SFTDataset(SFTDatasetConfig(data_path=prefix, seq_length=128, packing=False), prefix)
    assert len(flat) == 120 and all(len(flat.sample_ids(i)) == 1 for i in range(5))
    assert flat.efficiency < a.efficiency
    batch = collate_sft([a[0], flat[0]])
    assert batch["tokens"].shape == (2, 128) and batch["cu_seqlens"][1].tolist()[:3] == flat[0]["cu_seqlens"].tolist()
    assert (batch["cu_seqlens"][1][3:] == -1).all()


def test_split_by_ratio_or_separate_paths(prefix):
    assert parse_split("98,2") == [0.98, 0.02, 0.0]
    train, valid, test = build_sft_datasets(SFTDatasetConfig(data_path=prefix, seq_length=128, split="80,20"))
    t = {int(d) for i in range(len(train)) for d in train.sample_ids(i)}
    v = {int(d) for i in range(len(valid)) for d in valid.sample_ids(i)}
    assert test is None and not t & v and len(t | v) == 120 and len(v) == 24
    train, valid, _ = build_sft_datasets(SFTDatasetConfig(data_path=prefix + "_text_document", seq_length=128,
                                                          valid_data_path=prefix))
    assert sum(len(train.sample_ids(i)) for i in range(len(train))) == 120
    with pytest.raises(ValueError, match="--split"):
        SFTDatasetConfig(data_path=prefix, seq_length=128, split="0,1")
    with pytest.raises(FileNotFoundError, match="preprocess_data_sft"):
        SFTDataset(SFTDatasetConfig(data_path=prefix + "x", seq_length=128), prefix + "x")


def test_too_long_samples_are_skipped_and_counted(prefix):
    text = IndexedDataset(prefix + "_text_document")  # keep it alive: sequence_lengths views its mmap
    lengths = np.array(text.sequence_lengths)
    seq = int(np.median(lengths))
    ds = SFTDataset(SFTDatasetConfig(data_path=prefix, seq_length=seq), prefix)
    assert ds.skipped_too_long == int((lengths - 1 > seq).sum()) > 0


def test_download_script_offline_error_is_clear(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, str(REPO / "scripts/data/download_hf_dataset.py"), "--dataset-card",
                          "some-org/some-set", "--output-dir", str(tmp_path / "data"), "--cache-dir",
                          str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1
    assert "could not download 'some-org/some-set'" in run.stderr and "Traceback" not in run.stderr
    assert str(tmp_path / "data" / "some-org-some-set" / "some-org-some-set.json") in run.stderr
    assert not (tmp_path / "data").exists()
