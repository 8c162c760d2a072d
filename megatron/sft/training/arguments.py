"""Command-line / YAML configuration of SFT training.

Flag names are Megatron-LM's (``pretrain_gpt.py``) where the concept is the same. Each
``TrainConfig`` field carries its help text, and the command line is generated from the fields'
types (``Optional[int]`` -> an int flag, ``bool`` -> a switch, ``Literal[...]`` -> choices), so a
new setting is one field. Choices that live in a registry (``--attention-backend``) are declared
with ``_field(..., choices=<callable>)`` and read when the parser is built. A YAML file
(``--config``) may hold the same keys with ``-`` or ``_``; flags given on the command line win.
Invalid combinations fail at start with the values and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from typing import Any, Callable, Literal, Optional, Union

from megatron.sft.lora.settings import LoRASettings
from megatron.sft.runtime.attention import (
    attention_backend_choices,
    attention_backend_help,
    get_attention_backend,
)
from megatron.sft.runtime.layer_impl import TRANSFORMER_IMPLS
from megatron.sft.runtime.layout import FLAGS, ParallelLayout


#: TE's CP pads every document to 2·CP, so a rank's THD tokens vary per micro-batch and the
#: pipeline's fixed activation shape cannot carry them (checked here for --attention-backend te,
#: and by the trainer once ``auto`` has chosen)
TE_CP_PIPELINE = ("--attention-backend te with --context-parallel-size > 1 and "
                  "--pipeline-model-parallel-size > 1: TE pads each document to 2 x CP, so the "
                  "tokens per rank change per micro-batch and cannot cross pipeline stages; use "
                  "--attention-backend varlen (or flex) with --transformer-impl local, or PP 1")


def _field(default: Any, help: Union[str, Callable[[], str]], *, flag: Optional[str] = None,
           choices: Union[tuple, Callable[[], tuple], None] = None) -> Any:
    """A config field with its ``--help`` text; ``flag`` overrides the generated flag name
    (a ``True``-by-default switch is spelled as its negation, e.g. ``--no-packing``).
    ``choices`` (for a ``str`` field) and ``help`` may be callables, read when the parser is
    built, so that a registry's choices are its current names."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "flag": flag, "choices": choices})


@dataclasses.dataclass
class TrainConfig:
    """Everything ``tools/train_sft.py`` needs; the model shape comes from the checkpoint."""

    # --- model / checkpoints
    load: str = _field(None, "checkpoint to start from: a converted HF model "
                             "(convert_hf_to_megatron.sh) or a previous run to resume")
    save: Optional[str] = _field(None, "directory for this run's checkpoints; a re-run with "
                                       "--load pointing here resumes")
    finetune: bool = _field(False, "load weights only: start at iteration 0 with a fresh "
                                   "optimizer and LR schedule")
    save_interval: Optional[int] = _field(None, "save every N iterations (and always at the end)")
    exit_interval: Optional[int] = _field(None, "save and exit after an iteration divisible by N "
                                                "(for job time limits)")
    keep_last: int = _field(2, "keep only the newest K checkpoints in --save (0 keeps all)")
    # --- data
    data_path: Optional[str] = _field(None, "prefix of a pre-tokenized dataset "
                                            "(..._text_document.bin/.idx [+ _loss_mask_document])")
    valid_data_path: Optional[str] = _field(None, "separate validation prefix (then --split is "
                                                  "ignored)")
    split: str = _field("98,2,0", "train,valid,test weights over samples")
    seq_length: int = _field(4096, "tokens per row (packed rows hold several samples)")
    packing: bool = _field(True, "one sample per row, padded, instead of packing several "
                                 "samples per row with attention isolated per sample",
                           flag="--no-packing")
    # --- batch
    micro_batch_size: int = _field(1, "rows per forward/backward pass on one data-parallel rank")
    global_batch_size: int = _field(8, "rows per optimizer step over all data-parallel ranks and "
                                       "micro-batches")
    # --- schedule
    train_iters: Optional[int] = _field(None, "optimizer steps to train (or --train-epochs)")
    train_epochs: Optional[float] = _field(None, "passes over the training split, instead of "
                                                 "--train-iters")
    lr: float = _field(1e-5, "peak learning rate")
    min_lr: float = _field(0.0, "learning rate at the end of the decay")
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root"] = _field(
        "cosine", "learning-rate decay after warmup")
    lr_warmup_iters: Optional[int] = _field(None, "linear warmup steps (or --lr-warmup-fraction)")
    lr_warmup_fraction: Optional[float] = _field(None, "warmup as a fraction of the training "
                                                       "steps")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    adam_beta1: float = _field(0.9, "Adam beta1")
    adam_beta2: float = _field(0.95, "Adam beta2")
    adam_eps: float = _field(1e-8, "Adam epsilon")
    clip_grad: float = _field(1.0, "clip the global gradient norm to this (0 = off)")
    # --- parallelism, precision, implementation
    tensor_model_parallel_size: int = _field(1, "TP: split each layer's heads and FFN over this "
                                                "many ranks (must fit the checkpoint's split)")
    pipeline_model_parallel_size: int = _field(1, "PP: split the layers into this many stages")
    num_layers_per_virtual_pipeline_stage: Optional[int] = _field(
        None, "interleaved pipeline (VPP): layers per virtual stage")
    context_parallel_size: int = _field(
        1, "CP: split each row over this many ranks (chunks r and 2·CP-1-r of 2·CP; K/V "
           "all-gathered per layer); --seq-length must be divisible by 2·CP (x TP with "
           "--sequence-parallel); attention sdpa, varlen, flex or te")
    sequence_parallel: bool = _field(False, "sequence parallelism: norms, dropout and residuals "
                                            "on s/TP tokens per tensor-parallel rank (any "
                                            "--transformer-impl, CPU too)")
    use_distributed_optimizer: bool = _field(False, "shard optimizer state over data-parallel "
                                                    "ranks (ZeRO-1)")
    overlap_grad_reduce: bool = _field(
        True, "with data parallelism, do not overlap the gradient all-reduce/reduce-scatter "
              "with the backward pass (overlap is on by default when DP > 1)",
        flag="--no-overlap-grad-reduce")
    overlap_param_gather: bool = _field(
        True, "with the distributed optimizer and DP > 1, do not overlap the parameter "
              "all-gather with the next forward pass (on by default)",
        flag="--no-overlap-param-gather")
    bf16: bool = _field(False, "bf16 weights and activations, fp32 master weights in the "
                               "optimizer")
    recompute_granularity: Optional[Literal["full", "selective"]] = _field(
        None, "activation recompute: full (whole layers) or selective (core attention)")
    transformer_impl: str = _field(
        "auto", "layer modules: Transformer Engine, megatron-core's local ones, or auto (TE on "
                "GPU when it imports)", choices=TRANSFORMER_IMPLS)
    #: choices and help come from the backend registry in megatron/sft/runtime/attention.py
    attention_backend: str = _field("auto", attention_backend_help,
                                    choices=attention_backend_choices)
    # --- LoRA adapters (megatron/sft/lora/)
    lora_rank: int = _field(0, "LoRA: train rank-R adapters on a frozen base model (0 = off, "
                               "full fine-tuning); either --transformer-impl, with or without "
                               "--sequence-parallel")
    lora_alpha: float = _field(16.0, "LoRA: the adapter's output is scaled by alpha / rank")
    lora_dropout: float = _field(0.0, "LoRA: dropout on the adapter's input")
    lora_target_modules: str = _field(
        "linear_qkv,linear_proj,linear_fc1,linear_fc2",
        "LoRA: comma-separated megatron-core linears that get adapters (HF: linear_qkv = "
        "q/k/v_proj, linear_proj = o_proj, linear_fc1 = gate/up_proj, linear_fc2 = down_proj)")
    # --- loss
    chunked_loss: Literal["auto", "on", "off"] = _field(
        "auto", "output layer + cross-entropy in chunks of tokens, each chunk's gradients "
                "computed at once, so the [tokens, vocab/TP] logits never exist whole (exact); "
                "auto = on when micro-batch x seq-length / CP x vocab / TP exceeds 2^26 logits")
    # --- evaluation and logging
    eval_interval: Optional[int] = _field(None, "validate every N iterations")
    eval_iters: int = _field(10, "validation batches per evaluation")
    log_interval: int = _field(1, "print a log line every N iterations (the JSON log gets all)")
    tensorboard_dir: Optional[str] = _field(None, "write TensorBoard event files here")
    wandb_project: Optional[str] = _field(None, "log to this Weights & Biases project")
    log_json: Optional[str] = _field(None, "append one JSON line per iteration to this file")
    seed: int = _field(1234, "seed for initialisation, data order and dropout")
    skip_nan_steps: bool = _field(False, "skip an optimizer step whose loss is NaN/inf instead "
                                         "of stopping")
    no_progress: bool = _field(False, "no progress bar (logs only)")
    strict: bool = _field(False, "stop on data warnings (e.g. samples longer than "
                                 "max_position_embeddings) instead of training on")

    def parallel_layout(self, num_layers: Optional[int] = None) -> ParallelLayout:
        """The parallel sizes of this run as one :class:`ParallelLayout` (``num_layers`` turns
        ``--num-layers-per-virtual-pipeline-stage`` into chunks per pipeline rank)."""
        return ParallelLayout.from_flags(
            self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
            self.num_layers_per_virtual_pipeline_stage, num_layers,
            cp=self.context_parallel_size, spelling=FLAGS)

    def validate(self, world_size: int, num_layers: Optional[int] = None) -> None:
        """Raise ``ValueError`` naming the flags, their values and the fix."""
        layout = self.parallel_layout(num_layers)
        layout.validate(world_size=world_size, num_layers=num_layers, spelling=FLAGS,
                        seq_length=self.seq_length, sequence_parallel=self.sequence_parallel,
                        attention=self._attention_cp_problem)
        dp = layout.data_parallel_size(world_size)
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
        for f in dataclasses.fields(self):  # YAML values bypass argparse's choices
            choices = _choices(f)
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{_flag(f)} {getattr(self, f.name)!r}: use one of "
                                 f"{', '.join(str(c) for c in choices)}")
        if self.save_interval is not None and self.save is None:
            raise ValueError("--save-interval needs --save DIR")
        if self.lora_rank != 0:  # negative ranks are refused there too
            LoRASettings.from_flags(self.lora_rank, self.lora_alpha, self.lora_dropout,
                                    self.lora_target_modules)  # raises naming the flag
        if self.data_path is None:
            raise ValueError("--data-path is required (a prefix written by "
                             "scripts/data/tokenize_dataset.sh)")

    def _attention_cp_problem(self, cp: int) -> Optional[str]:
        """A named backend that has no context parallelism at all (device-specific refusals,
        e.g. varlen on CPU, come from the layer factory once the device is known)."""
        if self.attention_backend == "auto" or \
                self.attention_backend not in attention_backend_choices():
            return None
        spec = get_attention_backend(self.attention_backend)
        if spec.cp_native and self.pipeline_model_parallel_size > 1:
            return TE_CP_PIPELINE
        return None if spec.supports_cp else spec.check("local", "cpu", cp)

    def warmup_iters(self, total: int) -> int:
        if self.lr_warmup_iters is not None:
            return self.lr_warmup_iters
        if self.lr_warmup_fraction is not None:
            return int(math.floor(self.lr_warmup_fraction * total))
        return 0


# ------------------------------------------------------------------------------ generated CLI
def _base_type(field: dataclasses.Field) -> Any:
    """``Optional[X]`` -> ``X``; a ``Literal`` stays as it is."""
    hint = typing.get_type_hints(TrainConfig)[field.name]
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _flag_choices(field: dataclasses.Field) -> Optional[tuple]:
    """The values the flag accepts: the field's declared ``choices``, or its ``Literal``'s."""
    declared = field.metadata.get("choices")
    if declared is not None:
        return tuple(declared() if callable(declared) else declared)
    base = _base_type(field)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def _choices(field: dataclasses.Field) -> Optional[tuple]:
    """The values the field accepts (``None`` too when it is the default)."""
    choices = _flag_choices(field)
    if choices is not None and field.default is None:
        return choices + (None,)
    return choices


def _help(field: dataclasses.Field) -> str:
    text = field.metadata["help"]
    return text() if callable(text) else text


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Supervised fine-tuning on megatron-core. Launch with torchrun; the model is "
                    "rebuilt from the checkpoint given to --load.",
    )
    p.add_argument("--config", default=None, help="YAML file with the same keys as these flags")
    for field in dataclasses.fields(TrainConfig):
        base, flag, help_text = _base_type(field), _flag(field), _help(field)
        choices = _flag_choices(field)
        if base is bool:
            # A switch flips the default: --bf16 sets True, --no-packing sets False.
            p.add_argument(flag, dest=field.name, action="store_const",
                           const=not field.default, default=None, help=help_text)
        elif choices is not None:
            p.add_argument(flag, dest=field.name, choices=choices, default=None,
                           help=f"{help_text} (default: {field.default})")
        else:
            p.add_argument(flag, dest=field.name, type=base, default=None,
                           required=False, help=help_text if field.default is None
                           else f"{help_text} (default: {field.default})")
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
