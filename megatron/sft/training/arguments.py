"""Command-line / YAML configuration of SFT training.

Flag names are Megatron-LM's (``pretrain_gpt.py``) where the concept is the same. Each
``TrainConfig`` field carries its help text, and the command line is generated from the fields'
types (``Optional[int]`` -> an int flag, ``bool`` -> a switch, ``Literal[...]`` -> choices), so a
new setting is one field. Choices that live in a registry (``--attention-backend``) are declared
with ``_field(..., choices=<callable>)`` and read when the parser is built. A YAML file
(``--config``) may hold the same keys with ``-`` or ``_``, its values typed like the flags'
(``lr: 1e-5``, which PyYAML reads as a string, is a float); flags given on the command line win.
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
from megatron.sft.model.attention import (
    attention_backend_choices,
    attention_backend_help,
    get_attention_backend,
)
from megatron.sft.model.moe.experts import MOE_EXPERTS_HELP, MOE_EXPERTS_IMPLS
from megatron.sft.model.layer_impl import TRANSFORMER_IMPLS
from megatron.sft.runtime.layout import FLAGS, FSDP_STRATEGIES, ParallelLayout


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
    load: str = _field(None, "what to start from: a HuggingFace model directory (config.json + "
                             "*.safetensors, converted in memory at any layout, each rank "
                             "reading only its shard), a converted checkpoint "
                             "(convert_hf_to_megatron.sh) or a previous run to resume")
    save: Optional[str] = _field(None, "directory for this run's checkpoints; a re-run with "
                                       "--load pointing here resumes")
    finetune: bool = _field(False, "load weights only: start at iteration 0 with a fresh "
                                   "optimizer and LR schedule")
    save_interval: Optional[int] = _field(None, "save every N iterations (and always at the end)")
    save_hf: Optional[str] = _field(
        None, "also write the trained model as a HuggingFace directory here at the end (a LoRA "
              "run merged into its base), exported from the saved checkpoint by "
              "merge_and_export.sh's code; needs --save. The directory is replaced at each export")
    save_hf_interval: Optional[int] = _field(
        None, "with --save-hf: also save and export every N iterations (--save-hf then holds "
              "the latest)")
    save_hf_adapter: Optional[str] = _field(
        None, "with --lora-rank: also write the adapters as an HF PEFT adapter directory here "
              "whenever --save-hf exports (or at the end); needs --save")
    exit_interval: Optional[int] = _field(None, "save and exit after an iteration divisible by N "
                                                "(for job time limits)")
    exit_duration_in_mins: Optional[float] = _field(
        None, "save and exit (code 75: run again to resume) after the first iteration that ends "
              "this many minutes after the start, e.g. a little below a job's time limit; "
              "SIGTERM, SIGINT and SIGUSR1 do the same at once")
    hang_timeout_minutes: Optional[float] = _field(
        None, "stop every rank (code 76) when no training step has finished for this many "
              "minutes (fractions allowed), printing what each rank last did; also sets the "
              "collective timeout (twice this, at least 1 minute)")
    keep_last: int = _field(2, "keep only the newest K checkpoints in --save (0 keeps all); an "
                               "iteration no training run wrote (a converted base) is never "
                               "removed")
    verify: bool = _field(True, "do not check checkpoint files against the SHA-256 checksums "
                                "recorded when they were written (faster loads; a damaged file "
                                "then goes unnoticed unless it cannot be parsed)",
                          flag="--no-verify")
    override_opt_param_scheduler: bool = _field(
        False, "on resume, train with the LR schedule of the flags (--lr, --min-lr, "
               "--lr-decay-style, warm-up, --train-iters, --weight-decay) from the checkpoint's "
               "iteration on, instead of the checkpoint's schedule")
    no_load_optim: bool = _field(
        False, "on resume, do not load the optimizer state (Adam moments, fp32 main weights): "
               "it starts fresh, while weights, iteration, LR schedule and data position "
               "continue. Needed to resume under another data-parallel sharding "
               "(--use-megatron-fsdp, its strategy or DP size, --use-distributed-optimizer)")
    reset_data_position: bool = _field(
        False, "on resume, start the data (--data-path, --seq-length, --split, packing, --seed) "
               "from its first row: needed when they differ from the checkpoint's; iteration "
               "and LR schedule continue")
    # --- data
    data_path: Optional[str] = _field(None, "prefix of a pre-tokenized dataset "
                                            "(..._text_document.bin/.idx [+ _loss_mask_document])")
    valid_data_path: Optional[str] = _field(None, "separate validation prefix (then --split is "
                                                  "ignored)")
    split: str = _field("98,2,0", "train,valid,test weights over samples")
    seq_length: int = _field(4096, "tokens per row (packed rows hold several samples)")
    allow_tokenizer_mismatch: bool = _field(
        False, "train even when the data's tokenizer (its fingerprint in _stats.json) is not "
               "the model's (--load's tokenizer files), though both have the same size; without "
               "this it is an error")
    allow_dropping_long_samples: bool = _field(
        False, "train even when more than 5%% of the loss tokens are in samples longer than "
               "--seq-length (those samples are skipped; without this it is an error)")
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
    allow_zero_lr: bool = _field(False, "accept --lr 0 (the weights then never change: e.g. to "
                                        "measure the base model's loss or the throughput)")
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
    use_megatron_fsdp: bool = _field(
        False, "fully sharded data parallel with megatron-core's Megatron-FSDP: shard what "
               "--data-parallel-sharding-strategy says over the data-parallel ranks (with TP, "
               "not PP); checkpoints keep the per-(TP, PP) rank files")
    data_parallel_sharding_strategy: Optional[str] = _field(
        None, "with --use-megatron-fsdp: no_shard (DDP), optim (ZeRO-1), optim_grads (ZeRO-2) "
              "or optim_grads_params (ZeRO-3, the default here; Megatron-LM's is no_shard)",
        choices=FSDP_STRATEGIES)
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
    #: choices and help come from the backend registry in megatron/sft/model/attention/
    attention_backend: str = _field("auto", attention_backend_help,
                                    choices=attention_backend_choices)
    # --- Mixture-of-Experts (megatron/sft/model/moe/settings.py); ignored by dense models
    expert_model_parallel_size: int = _field(1, "EP: split each MoE layer's routed experts over "
                                                "this many ranks (carved out of data "
                                                "parallelism; must divide the experts)")
    expert_tensor_parallel_size: Optional[int] = _field(
        None, "TP inside each expert (default and only supported value: the TP size, which "
              "checkpoint files are split by)")
    moe_token_dispatcher_type: Optional[Literal["alltoall", "allgather"]] = _field(
        None, "how tokens reach their experts' ranks (default: alltoall with EP > 1, else "
              "allgather)")
    moe_aux_loss_coeff: Optional[float] = _field(
        None, "load-balancing loss coefficient (default: the HF config's router_aux_loss_coef; "
              "megatron-core's loss is per layer and summed over layers, see README)")
    moe_z_loss_coeff: Optional[float] = _field(None, "router z-loss coefficient (default: off)")
    moe_router_bias_update_rate: Optional[float] = _field(
        None, "routers with an expert bias (DeepSeek-V3's e_score_correction_bias): after each "
              "step the bias of every expert above the mean load goes down by this much, the "
              "others up, as megatron-core does (default: megatron-core's 1e-3)")
    moe_router_freeze_expert_bias: bool = _field(
        False, "keep the routers' expert bias at the checkpoint's values (no update; the log's "
               "moe/expert_bias_drift stays 0)")
    moe_expert_capacity_factor: Optional[float] = _field(
        None, "drop tokens beyond this factor of each expert's even share (default: dropless)")
    moe_experts_impl: str = _field("auto", MOE_EXPERTS_HELP, choices=MOE_EXPERTS_IMPLS)
    moe_router_freeze: bool = _field(
        False, "do not train the MoE routers (their weights, and the expert bias where a family "
               "has one): routing stays the base model's")
    moe_experts_freeze: bool = _field(
        False, "do not train the routed experts (full fine-tuning of everything else; with "
               "--lora-rank: no adapters on the routed experts)")
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
    eval_generate: int = _field(
        0, "at every evaluation, greedily continue N prompts (the first N validation samples "
           "cut before their first assistant turn, or --eval-prompts) and print them; also in "
           "the JSON log and TensorBoard (0 = off; needs --eval-interval)")
    eval_prompts: Optional[str] = _field(
        None, "with --eval-generate: a JSONL file of conversations (any format the "
              "pre-tokenizer reads) to continue instead of validation samples; a record with an "
              "answer is cut before its first assistant turn, a prompt-only one gets the chat "
              "template's generation prompt")
    eval_generate_tokens: int = _field(256, "with --eval-generate: new tokens per prompt at "
                                            "most (a prompt stops earlier at the chat "
                                            "template's end-of-turn token or EOS)")
    tokenizer_model: Optional[str] = _field(
        None, "HF tokenizer folder for --eval-generate (decoding, chat template, end-of-turn "
              "token); default: the tokenizer the data's _stats.json records")
    log_interval: int = _field(1, "print a log line every N iterations (the JSON log gets all)")
    tensorboard_dir: Optional[str] = _field(None, "write TensorBoard event files here")
    wandb_project: Optional[str] = _field(None, "log to this Weights & Biases project")
    log_json: Optional[str] = _field(None, "append one JSON line per iteration to this file")
    seed: int = _field(1234, "seed for initialisation, data order and dropout")
    skip_nan_steps: bool = _field(False, "skip an optimizer step whose loss is NaN/inf instead "
                                         "of stopping")
    no_progress: bool = _field(False, "no progress bar (logs only)")
    strict: bool = _field(False, "stop on warnings instead of training on: samples longer "
                                 "than max_position_embeddings, a --load iteration without "
                                 "checksums.json")

    def parallel_layout(self, num_layers: Optional[int] = None) -> ParallelLayout:
        """The parallel sizes of this run as one :class:`ParallelLayout` (``num_layers`` turns
        ``--num-layers-per-virtual-pipeline-stage`` into chunks per pipeline rank)."""
        return ParallelLayout.from_flags(
            self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
            self.num_layers_per_virtual_pipeline_stage, num_layers,
            ep=self.expert_model_parallel_size, etp=self.expert_tensor_parallel_size,
            cp=self.context_parallel_size, fsdp=self.fsdp_strategy, spelling=FLAGS)

    @property
    def fsdp_strategy(self) -> Optional[str]:
        """Megatron-FSDP's sharding strategy, ``None`` without ``--use-megatron-fsdp``."""
        if not self.use_megatron_fsdp:
            return None
        return self.data_parallel_sharding_strategy or "optim_grads_params"

    def validate(self, world_size: int, num_layers: Optional[int] = None) -> None:
        """Raise ``ValueError`` naming the flags, their values and the fix."""
        if self.data_parallel_sharding_strategy is not None and not self.use_megatron_fsdp:
            raise ValueError(f"--data-parallel-sharding-strategy "
                             f"{self.data_parallel_sharding_strategy} needs --use-megatron-fsdp; "
                             "add it, or drop the strategy")
        layout = self.parallel_layout(num_layers)
        layout.validate(world_size=world_size, num_layers=num_layers, spelling=FLAGS,
                        seq_length=self.seq_length, sequence_parallel=self.sequence_parallel,
                        attention=self._attention_cp_problem)
        layout.check_files(FLAGS)
        dp = layout.data_parallel_size(world_size)
        self._check_counts(dp)
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
        self._check_learning_rate()
        if self.train_iters is not None:  # else the trainer calls it once the epochs are counted
            self.check_schedule(self.train_iters)
        for f in dataclasses.fields(self):  # YAML values bypass argparse's choices
            choices = _choices(f)
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{_flag(f)} {getattr(self, f.name)!r}: use one of "
                                 f"{', '.join(str(c) for c in choices)}")
        if self.save_interval is not None and self.save is None:
            raise ValueError("--save-interval needs --save DIR")
        self._check_hf_outputs()
        if self.lora_rank != 0:  # negative ranks are refused there too
            LoRASettings.from_flags(self.lora_rank, self.lora_alpha, self.lora_dropout,
                                    self.lora_target_modules)  # raises naming the flag
            if self.use_megatron_fsdp:
                raise ValueError(f"--lora-rank {self.lora_rank} with --use-megatron-fsdp: "
                                 "megatron-core 0.16's Megatron-FSDP puts a gradient hook on "
                                 "every weight and fails on LoRA's frozen base; drop "
                                 "--use-megatron-fsdp (with --use-distributed-optimizer the "
                                 "adapters' optimizer state is sharded, and LoRA has no other)")
        if self.data_path is None:
            raise ValueError("--data-path is required (a prefix written by "
                             "scripts/data/tokenize_dataset.sh)")

    def _check_counts(self, dp: int) -> None:
        """Sizes and intervals that must be positive: a 0 divides by zero (``--micro-batch-size``,
        ``--log-interval``), averages over nothing (``--eval-iters``) or silently turns a feature
        off (``--save-interval 0`` never saved between the start and the end)."""
        if self.micro_batch_size < 1:
            raise ValueError(
                f"--micro-batch-size {self.micro_batch_size}: a forward/backward pass needs at "
                "least one row; use --micro-batch-size 1 or more (the global batch is reached "
                "through more micro-batches)")
        if self.global_batch_size < 1:
            raise ValueError(
                f"--global-batch-size {self.global_batch_size}: an optimizer step needs at least "
                f"one row; use a positive multiple of --micro-batch-size {self.micro_batch_size} "
                f"x data-parallel size {dp} = {self.micro_batch_size * dp}")
        if self.train_iters is not None and self.train_iters < 1:
            # 0 too: a run that trains nothing exits 0 having saved nothing, which no one means
            raise ValueError(f"--train-iters {self.train_iters} trains nothing: give the number "
                             "of optimizer steps, 1 or more (or --train-epochs)")
        if self.train_epochs is not None and not self.train_epochs > 0:
            raise ValueError(f"--train-epochs {self.train_epochs} trains nothing: give a positive "
                             "number of passes over the training split, e.g. 1 or 0.5")
        if self.seq_length < 2:
            raise ValueError(f"--seq-length {self.seq_length}: a row needs at least 2 tokens (one "
                             "input, one label); use the length the data was tokenized for")
        if self.log_interval < 1:
            raise ValueError(f"--log-interval {self.log_interval}: give a positive number of "
                             "iterations between log lines (1 logs every iteration; the --log-json "
                             "file gets every iteration anyway)")
        if self.eval_iters < 0:
            raise ValueError(f"--eval-iters {self.eval_iters} is negative; give the number of "
                             "validation batches per evaluation, e.g. 10")
        if self.eval_interval is not None:
            if self.eval_interval < 1:
                raise ValueError(f"--eval-interval {self.eval_interval}: give a positive number "
                                 "of iterations between evaluations, or drop --eval-interval to "
                                 "not evaluate")
            if self.eval_iters == 0:
                raise ValueError(f"--eval-iters 0 with --eval-interval {self.eval_interval}: each "
                                 "evaluation would average over no batch; give --eval-iters 1 or "
                                 "more, or drop --eval-interval to not evaluate")
        self._check_eval_generate()
        for name in ("exit_duration_in_mins", "hang_timeout_minutes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {value}: give a positive number of minutes (fractions "
                                 f"such as 0.5 are fine), or drop {flag}")
        for name, what in (("save_interval", "the run still saves at the end"),
                           ("exit_interval", "the run then trains to the end")):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {value}: give a positive number of iterations, or drop "
                                 f"{flag} ({what})")

    def _check_eval_generate(self) -> None:
        """``--eval-generate`` and its companions, naming the flag and the fix."""
        if self.eval_generate < 0:
            raise ValueError(f"--eval-generate {self.eval_generate} is negative; give the "
                             "number of prompts to continue at each evaluation, or 0 (off)")
        if self.eval_generate and self.eval_interval is None:
            raise ValueError(f"--eval-generate {self.eval_generate} generates at every "
                             "evaluation, and without --eval-interval there is none; add "
                             "--eval-interval N")
        if self.eval_generate_tokens < 1:
            raise ValueError(f"--eval-generate-tokens {self.eval_generate_tokens}: give a "
                             "positive number of new tokens, e.g. 256")
        if self.eval_prompts is not None and not self.eval_generate:
            raise ValueError(f"--eval-prompts {self.eval_prompts} needs --eval-generate N (how "
                             "many of its prompts to continue); add it")

    def _check_hf_outputs(self) -> None:
        """``--save-hf*`` combinations, naming the flag and the fix."""
        if self.save_hf_interval is not None and self.save_hf is None:
            raise ValueError(f"--save-hf-interval {self.save_hf_interval} needs --save-hf DIR "
                             "(where the HF model goes); add it, or drop --save-hf-interval")
        if self.save_hf_interval is not None and self.save_hf_interval < 1:
            raise ValueError(f"--save-hf-interval {self.save_hf_interval}: give a positive number "
                             "of iterations, or drop it (--save-hf still exports at the end)")
        for flag, value in (("--save-hf", self.save_hf),
                            ("--save-hf-adapter", self.save_hf_adapter)):
            if value is not None and self.save is None:
                raise ValueError(f"{flag} {value} needs --save DIR: the HF files are exported "
                                 "from the saved Megatron checkpoint (as merge_and_export.sh "
                                 "does); add --save")
        if self.save_hf_adapter is not None and not self.lora_rank:
            raise ValueError(f"--save-hf-adapter {self.save_hf_adapter} needs --lora-rank R: only "
                             "a LoRA run has an adapter; use --save-hf for the full model")

    def _check_learning_rate(self) -> None:
        if not self.lr >= 0:  # NaN too
            what = "negative: the optimizer would climb the loss" if self.lr < 0 else "not a number"
            raise ValueError(f"--lr {self.lr} is {what}; give a positive --lr such as 1e-5")
        if self.lr == 0 and not self.allow_zero_lr:
            raise ValueError("--lr 0.0: with a zero learning rate the weights never change and "
                             "the run trains nothing; give a positive --lr such as 1e-5, or "
                             "--allow-zero-lr to run anyway (e.g. to measure the base model's "
                             "loss or the throughput)")
        if not self.min_lr >= 0:
            raise ValueError(f"--min-lr {self.min_lr} is negative; use 0 or a value below --lr "
                             f"{self.lr}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay {self.weight_decay} is negative; use 0 (off) or a "
                             "positive value such as 0.1")
        if not self.clip_grad >= 0:
            raise ValueError(f"--clip-grad {self.clip_grad} is negative; use 0 (off) or a "
                             "positive gradient norm such as 1.0")
        if self.lr_warmup_iters is not None and self.lr_warmup_iters < 0:
            raise ValueError(f"--lr-warmup-iters {self.lr_warmup_iters} is negative; use 0 (no "
                             "warm-up) or a count below the training iterations")
        fraction = self.lr_warmup_fraction
        if fraction is not None and not 0 <= fraction < 1:
            raise ValueError(f"--lr-warmup-fraction {fraction} is outside [0, 1): it is the share "
                             "of the training iterations spent warming up; use e.g. 0.03 (or "
                             "--lr-warmup-iters N)")

    def check_schedule(self, train_iters: int) -> None:
        """Warm-up must end before training does (megatron-core's scheduler otherwise stops
        with a bare ``AssertionError: lr_warmup_steps < lr_decay_steps``). ``train_iters`` is
        the run's iteration count: ``--train-iters``, or what ``--train-epochs`` comes to, which
        only the trainer knows once the data is built.

        Example: ``--lr-warmup-iters 5 --train-iters 5`` -> ValueError naming both flags.
        """
        warmup = self.warmup_iters(train_iters)
        if warmup < train_iters:
            return
        iters = (f"--train-iters {train_iters}" if self.train_iters is not None else
                 f"the {train_iters} iteration(s) that --train-epochs {self.train_epochs} gives")
        raise ValueError(
            f"--lr-warmup-iters {warmup} is not below {iters}: the learning rate would never "
            f"finish warming up; use --lr-warmup-iters {train_iters // 10} (or any value below "
            f"{train_iters}), --lr-warmup-fraction 0.1, or train longer")
    def _attention_cp_problem(self, cp: int) -> Optional[str]:
        """A named backend that has no context parallelism at all (device-specific refusals,
        e.g. varlen on CPU, come from the layer factory once the device is known)."""
        if self.attention_backend == "auto" or \
                self.attention_backend not in attention_backend_choices():
            return None
        return get_attention_backend(self.attention_backend).cp_problem(
            cp, self.pipeline_model_parallel_size)

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


# ------------------------------------------------------------------------------ YAML --config
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _accepts_none(field: dataclasses.Field) -> bool:
    """``Optional[X]`` fields, and fields whose default is None (``load``), take ``null``."""
    hint = typing.get_type_hints(TrainConfig)[field.name]
    return field.default is None or (typing.get_origin(hint) is typing.Union
                                     and type(None) in typing.get_args(hint))


def _expected(field: dataclasses.Field) -> str:
    """What a field's flag takes, in words: ``an integer``, ``one of full, selective or null``."""
    base, choices = _base_type(field), _flag_choices(field)
    if base is bool:
        text = "true or false"
    elif choices is not None:
        text = "one of " + ", ".join(str(c) for c in choices)
    else:
        text = {int: "an integer", float: "a number"}.get(base, "a string")
    return text + (" or null" if _accepts_none(field) else "")


def _yaml_kind(value: Any) -> str:
    """``'3'`` -> ``a string``; ``[1]`` -> ``a list``: how YAML read a value."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                       (str, "a string"), (list, "a list"), (dict, "a mapping")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _example(field: dataclasses.Field, key: str) -> str:
    """``lr`` -> ``lr: 1.0e-05`` (written so that PyYAML itself reads the right type)."""
    import yaml

    base, default, choices = _base_type(field), field.default, _flag_choices(field)
    if base is bool:
        value = not default
    elif default is not None:
        value = default
    else:
        value = choices[0] if choices else {int: 10, float: 0.1}.get(base, "PATH")
    return f"{key}: {yaml.safe_dump(value).splitlines()[0]}"


def _typed(field: dataclasses.Field, value: Any) -> Any:
    """A YAML value as its flag would have it: ``"1e-5"`` (PyYAML reads a float without a dot
    as a string) -> ``1e-05``; ``"false"``/``"no"``/``0`` -> ``False``; ``"3"`` -> ``3``.
    Raises ``TypeError`` for a value the flag would refuse (``"abc"`` or ``[3]`` for an int)."""
    if value is None:
        if _accepts_none(field):
            return None
        raise TypeError
    base, choices = _base_type(field), _flag_choices(field)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise TypeError
    if isinstance(value, (bool, list, dict)):  # no flag takes these
        raise TypeError
    kind = type(choices[0]) if choices else base  # a Literal's values are strings
    if kind is int:
        if isinstance(value, float):
            raise TypeError  # as on the command line: --train-iters 3.5 is refused
        try:
            typed = int(value.strip() if isinstance(value, str) else value)
        except ValueError:
            raise TypeError from None
    elif kind is float:
        try:
            typed = float(value.strip() if isinstance(value, str) else value)
        except ValueError:
            raise TypeError from None
    else:  # a number for a string flag (split: 100) is what the command line would pass
        typed = value if isinstance(value, str) else str(value)
    if choices is not None and typed not in choices:
        raise TypeError
    return typed


def _unknown_key(path: str, key: Any, fields: dict[str, dataclasses.Field]) -> str:
    """An unknown key, with the likely one: ``no-packing: true`` -> ``packing: false``."""
    import difflib

    name = str(key).replace("-", "_")
    negated = {_flag(f)[2:].replace("-", "_"): f for f in fields.values() if f.metadata.get("flag")}
    if name in negated:
        f = negated[name]
        hint = f"; write '{f.name}: {str(not f.default).lower()}' for {_flag(f)}"
    else:
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"{path}: unknown key {key!r}{hint} (keys are the flag names without '--', with "
            "'-' or '_'; see --help)")


def load_yaml_config(path: str) -> dict[str, Any]:
    """The ``--config`` file as ``{field name: value}``, each value typed like its flag's.

    Example: ``lr: 1e-5`` / ``bf16: "false"`` / ``train-iters: "3"`` ->
    ``{"lr": 1e-05, "bf16": False, "train_iters": 3}``. A file that is not a mapping, broken
    YAML, an unknown key or a value its flag would refuse is a ``ValueError`` naming the file,
    the key and the expected type.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--config {path}: cannot read it as text ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{path} is not valid YAML: {problem}{where}; write one 'key: value' "
                         "per line, the keys being flag names (e.g. 'lr: 1.0e-5')") from None
    if loaded is None:  # an empty file
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds {_yaml_kind(loaded)}, but a --config file must be a "
                         "mapping of flag names to values: one 'key: value' per line (e.g. "
                         "'lr: 1.0e-5'), without a leading '- '")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise ValueError(_unknown_key(path, key, fields))
        if name in values:
            raise ValueError(f"{path}: {name} is given twice (as '-' and '_' spellings); keep one")
        field = fields[name]
        try:
            values[name] = _typed(field, value)
        except TypeError:
            shown = ("null" if value is None else str(value).lower() if isinstance(value, bool)
                     else repr(value))
            kind = "" if value is None else f" ({_yaml_kind(value)})"
            raise ValueError(f"{path}: key {key!r} is {shown}{kind}, but {_flag(field)} takes "
                             f"{_expected(field)}; write e.g. '{_example(field, key)}'") from None
    return values


def parse_config(argv: Optional[list[str]] = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = load_yaml_config(args.config) if args.config else {}
    for key, value in vars(args).items():
        if key != "config" and value is not None:
            values[key] = value
    if not values.get("load"):
        raise ValueError("--load is required: a HuggingFace model directory, a checkpoint from "
                         "convert_hf_to_megatron.sh or a previous run")
    return TrainConfig(**values)


if __name__ == "__main__":  # pragma: no cover - debugging aid
    print(parse_config(sys.argv[1:]))
