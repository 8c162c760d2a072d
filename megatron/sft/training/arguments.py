"""Command-line / YAML configuration of SFT training.

Flag names are Megatron-LM's (``pretrain_gpt.py``) where the concept is the same. A YAML file
(``--config``) may hold the same keys with ``-`` or ``_``; flags given on the command line win.
Invalid combinations fail at start with the values and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any, Optional


@dataclasses.dataclass
class TrainConfig:
    """Everything ``tools/train_sft.py`` needs; model shape comes from the checkpoint."""

    # --- model / checkpoints
    load: str
    save: Optional[str] = None
    finetune: bool = False
    save_interval: Optional[int] = None
    exit_interval: Optional[int] = None
    keep_last: int = 2
    # --- data
    data_path: Optional[str] = None
    valid_data_path: Optional[str] = None
    split: str = "98,2,0"
    seq_length: int = 4096
    packing: bool = True
    # --- batch
    micro_batch_size: int = 1
    global_batch_size: int = 8
    # --- schedule
    train_iters: Optional[int] = None
    train_epochs: Optional[float] = None
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: Optional[int] = None
    lr_warmup_fraction: Optional[float] = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # --- parallelism and precision
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    bf16: bool = False
    recompute_granularity: Optional[str] = None
    transformer_impl: str = "auto"
    # --- evaluation and logging
    eval_interval: Optional[int] = None
    eval_iters: int = 10
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    log_json: Optional[str] = None
    seed: int = 1234
    skip_nan_steps: bool = False
    no_progress: bool = False
    strict: bool = False

    def validate(self, world_size: int, num_layers: Optional[int] = None) -> None:
        """Raise ``ValueError`` naming the flags, their values and the fix."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by "
                             f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size "
                             f"{pp}; launch a multiple of {tp * pp} processes")
        dp = world_size // (tp * pp)
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ValueError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size {dp}; "
                f"use a multiple of {self.micro_batch_size * dp}")
        if (self.train_iters is None) == (self.train_epochs is None):
            raise ValueError("give exactly one of --train-iters and --train-epochs")
        if self.lr_warmup_iters is not None and self.lr_warmup_fraction is not None:
            raise ValueError("can't give both --lr-warmup-iters and --lr-warmup-fraction; "
                             "choose one")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        if self.lr_decay_style not in ("constant", "linear", "cosine", "inverse-square-root"):
            raise ValueError(f"--lr-decay-style {self.lr_decay_style!r}: use constant, linear, "
                             "cosine or inverse-square-root")
        if self.num_layers_per_virtual_pipeline_stage is not None:
            if pp < 2:
                raise ValueError("--num-layers-per-virtual-pipeline-stage needs "
                                 "--pipeline-model-parallel-size >= 2")
            if num_layers is not None and num_layers % (pp * self.num_layers_per_virtual_pipeline_stage):
                raise ValueError(
                    f"num_layers {num_layers} is not divisible by --pipeline-model-parallel-size "
                    f"{pp} x --num-layers-per-virtual-pipeline-stage "
                    f"{self.num_layers_per_virtual_pipeline_stage}")
        if num_layers is not None and num_layers % pp:
            raise ValueError(f"num_layers {num_layers} is not divisible by "
                             f"--pipeline-model-parallel-size {pp}")
        if self.save_interval is not None and self.save is None:
            raise ValueError("--save-interval needs --save DIR")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError("--recompute-granularity must be full or selective")
        if self.data_path is None:
            raise ValueError("--data-path is required (a prefix written by "
                             "scripts/data/tokenize_dataset.sh)")

    def warmup_iters(self, total: int) -> int:
        if self.lr_warmup_iters is not None:
            return self.lr_warmup_iters
        if self.lr_warmup_fraction is not None:
            return int(math.floor(self.lr_warmup_fraction * total))
        return 0


_BOOL_FLAGS = {"finetune", "sequence_parallel", "use_distributed_optimizer", "bf16",
               "skip_nan_steps", "no_progress", "strict"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Supervised fine-tuning on megatron-core. Launch with torchrun; the model is "
                    "rebuilt from the checkpoint given to --load.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file with the same keys as these flags")
    defaults = TrainConfig(load="")
    helps = {
        "load": "checkpoint to start from (converted HF model, or a previous run to resume)",
        "save": "directory for checkpoints of this run",
        "finetune": "load weights only: iteration 0, fresh optimizer and LR schedule",
        "save_interval": "save every N iterations (and always at the end)",
        "keep_last": "keep only the newest K checkpoints in --save",
        "exit_interval": "save and exit after an iteration divisible by N (job time limits)",
        "data_path": "prefix of a pre-tokenized dataset (..._text_document.bin/.idx [+ loss mask])",
        "valid_data_path": "separate validation prefix (then --split is ignored)",
        "split": "train,valid,test weights over samples",
        "packing": "pack several samples per sequence (attention isolated per sample)",
        "train_epochs": "train for this many passes over the training split instead of --train-iters",
        "transformer_impl": "transformer_engine, local, or auto (TE on GPU when installed)",
        "log_json": "append one JSON line per logged iteration to this file",
        "skip_nan_steps": "skip an optimizer step whose loss is NaN/inf instead of stopping",
        "eval_iters": "validation batches per evaluation",
        "strict": "stop on data warnings (e.g. samples longer than max_position_embeddings)",
    }
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name in _BOOL_FLAGS:
            p.add_argument(flag, action="store_true", default=None, help=helps.get(field.name))
        elif field.name == "packing":
            p.add_argument("--no-packing", dest="packing", action="store_false", default=None,
                           help="one sample per sequence, padded (for comparison)")
        else:
            default = getattr(defaults, field.name) if field.name != "load" else None
            typ = {int: int, float: float}.get(type(default), str)
            if field.name in ("save_interval", "exit_interval", "train_iters", "lr_warmup_iters", "eval_interval",
                              "num_layers_per_virtual_pipeline_stage"):
                typ = int
            if field.name in ("train_epochs", "lr_warmup_fraction"):
                typ = float
            p.add_argument(flag, type=typ, default=None, help=helps.get(field.name),
                           required=False)
    return p


def parse_config(argv: Optional[list[str]] = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        import yaml

        with open(args.config) as f:
            loaded = yaml.safe_load(f) or {}
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        for key, value in loaded.items():
            name = key.replace("-", "_")
            if name not in names:
                raise ValueError(f"{args.config}: unknown key {key!r}")
            values[name] = value
    for key, value in vars(args).items():
        if key != "config" and value is not None:
            values[key] = value
    if not values.get("load"):
        raise ValueError("--load is required: a checkpoint from convert_hf_to_megatron.sh or a run")
    return TrainConfig(**values)


if __name__ == "__main__":  # pragma: no cover - debugging aid
    print(parse_config(sys.argv[1:]))
