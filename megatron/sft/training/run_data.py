"""The run's datasets and its length: built once; ``--train-epochs`` counts one epoch's rows,
then the same dataset is extended to the iterations it implies."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from megatron.sft.data.sft_dataset import SFTDataset, SFTDatasetConfig, build_sft_datasets
from megatron.sft.training.resume import data_identity


@dataclass
class RunData:
    train_ds: SFTDataset
    valid_ds: Optional[SFTDataset]
    train_iters: int                    # from --train-iters or --train-epochs
    identity: dict[str, Any]            # which data a saved data position points into


def build_run_data(cfg, log: Callable[[str], None]) -> RunData:
    data = SFTDatasetConfig(data_path=cfg.data_path, seq_length=cfg.seq_length,
                            seed=cfg.seed, packing=cfg.packing, split=cfg.split,
                            valid_data_path=cfg.valid_data_path)
    if cfg.train_iters is not None:
        train_iters = cfg.train_iters
        train_ds, valid_ds, _ = build_sft_datasets(
            data, train_samples=train_iters * cfg.global_batch_size)
    else:
        train_ds, valid_ds, _ = build_sft_datasets(data)
        train_iters = max(1, math.ceil(train_ds.epoch_rows * cfg.train_epochs
                                       / cfg.global_batch_size))
        train_ds.extend_to(train_iters * cfg.global_batch_size)
    identity = data_identity(cfg, Path(train_ds.prefix + "_stats.json"))
    log(f"train rows {len(train_ds)} (packing efficiency {train_ds.efficiency:.1%}), valid rows "
        f"{len(valid_ds) if valid_ds else 0}")
    return RunData(train_ds, valid_ds, train_iters, identity)
