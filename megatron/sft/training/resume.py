"""Resume that does what it says: what a resumed run keeps from its checkpoint, what it takes
from the new flags, and the error when they disagree (pure: dicts in, decisions out).

A training checkpoint carries the LR schedule (megatron-core's ``OptimizerParamScheduler``
state, in samples) and the data position. On resume:

- **schedule**: the checkpoint's is kept and printed. A flag that asks for a different one
  (``--lr``, ``--min-lr``, ``--lr-decay-style``, warm-up, ``--weight-decay``) is an error naming
  both values and the two fixes: ``--override-opt-param-scheduler`` (take the new values from
  here on) or drop the flag. A ``--train-iters`` past the schedule's end is allowed and says
  what LR the extra iterations get. A flag counts as given when it differs from its default.
- **optimizer**: Adam's betas and epsilon come with the checkpoint's optimizer state; a flag
  that asks for other values is an error naming both, or, with
  ``--override-opt-param-scheduler``, put into the restored optimizer.
- **data**: the position is the number of rows of *this* dataset consumed so far; a changed
  ``--global-batch-size`` continues from it. A different dataset (path, its stats, sequence
  length, split, packing, seed) is an error unless ``--reset-data-position`` starts it over.

Example: a run saved at iteration 50 of 100 with ``--lr 1e-4``, resumed with ``--lr 2e-5``::

    ResumeError: --lr 2e-05 differs from the checkpoint's LR schedule (1e-04): ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

#: scheduler state key -> (the flag that sets it, the TrainConfig field whose default tells if
#: it was given)
SCHEDULE_FLAGS = {
    "max_lr": ("--lr", "lr"),
    "min_lr": ("--min-lr", "min_lr"),
    "lr_decay_style": ("--lr-decay-style", "lr_decay_style"),
    "lr_warmup_steps": ("--lr-warmup-iters / --lr-warmup-fraction", "lr_warmup_iters"),
    "start_wd": ("--weight-decay", "weight_decay"),
}
#: Adam setting -> (the flag that sets it, the TrainConfig field, its value in a torch param
#: group); the optimizer state of a checkpoint carries them, and loading it would silently
#: replace the flags' values
OPTIMIZER_FLAGS = {
    "adam_beta1": ("--adam-beta1", lambda group: group["betas"][0]),
    "adam_beta2": ("--adam-beta2", lambda group: group["betas"][1]),
    "adam_eps": ("--adam-eps", lambda group: group["eps"]),
}
#: data identity key -> the flag that sets it
DATA_FLAGS = {"data_path": "--data-path", "stats": "--data-path (its _stats.json)",
              "seq_length": "--seq-length", "split": "--split", "packing": "--no-packing",
              "seed": "--seed"}


class ResumeError(ValueError):
    """A resume that would silently do something else than the flags say."""


def data_identity(cfg, stats_path: Optional[Path] = None) -> dict[str, Any]:
    """What decides which rows a data position points at."""
    stats = None
    if stats_path is not None and Path(stats_path).exists():
        stats = hashlib.sha256(Path(stats_path).read_bytes()).hexdigest()[:16]
    return {"data_path": cfg.data_path, "stats": stats, "seq_length": cfg.seq_length,
            "split": cfg.split, "packing": cfg.packing, "seed": cfg.seed}


@dataclasses.dataclass
class ResumePlan:
    #: rows of the current dataset consumed before the next step
    data_position: int
    #: take the flags' LR schedule instead of the checkpoint's
    override_schedule: bool
    #: lines for the log
    notes: list[str]
    #: Adam settings of the flags to put into the restored optimizer (``adam_beta1``: 0.1, ...)
    optimizer_overrides: dict[str, float] = dataclasses.field(default_factory=dict)


def saved_optimizer_settings(optimizer_state: Any) -> Optional[dict[str, float]]:
    """``{"adam_beta1", "adam_beta2", "adam_eps"}`` of a saved megatron-core optimizer state
    (the first torch param group found, however deep its wrappers nest it); ``None`` if none.

    >>> saved_optimizer_settings({"optimizer": {"param_groups": [{"betas": (0.9, 0.95),
    ...                                                           "eps": 1e-8}]}})
    {'adam_beta1': 0.9, 'adam_beta2': 0.95, 'adam_eps': 1e-08}
    """
    stack = [optimizer_state]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            groups = node.get("param_groups")
            if isinstance(groups, list) and groups and isinstance(groups[0], dict) \
                    and "betas" in groups[0] and "eps" in groups[0]:
                return {key: float(value(groups[0]))
                        for key, (_, value) in OPTIMIZER_FLAGS.items()}
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return None


def apply_optimizer_settings(optimizer, settings: dict[str, float]) -> None:
    """Put ``settings`` (``adam_beta1``/``adam_beta2``/``adam_eps``) into every param group of
    a restored optimizer (megatron-core's ``param_groups`` are its torch optimizers' own)."""
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        group["betas"] = (settings.get("adam_beta1", beta1), settings.get("adam_beta2", beta2))
        group["eps"] = settings.get("adam_eps", group["eps"])


def _plan_optimizer(cfg, saved: Optional[dict[str, float]], override: bool, ckpt: str,
                    iteration: int, notes: list[str]) -> dict[str, float]:
    """The Adam settings a resumed run uses: the checkpoint's, unless a flag asks for others:
    then ``--override-opt-param-scheduler`` takes them (returned, applied after the load), and
    without it they are a :class:`ResumeError` naming both values."""
    overrides: dict[str, float] = {}
    for field, (flag, _) in OPTIMIZER_FLAGS.items():
        old, new = (saved or {}).get(field), getattr(cfg, field)
        if old is None or old == new or not _given(cfg, field):
            continue
        if not override:
            raise ResumeError(
                f"{flag} {_fmt(new)} differs from the optimizer state of the checkpoint being "
                f"resumed ({ckpt}: {_fmt(old)}), which would replace it unsaid. Pass "
                f"--override-opt-param-scheduler to train with {flag} {_fmt(new)} from "
                f"iteration {iteration} on, drop {flag} to keep the checkpoint's, or pass "
                "--no-load-optim to start the optimizer state fresh")
        overrides[field] = new
        notes.append(f"--override-opt-param-scheduler: {flag} {_fmt(new)} replaces the "
                     f"checkpoint's {_fmt(old)} from iteration {iteration} on")
    return overrides


def _given(cfg, field: str) -> bool:
    f = next(f for f in dataclasses.fields(cfg) if f.name == field)
    value = getattr(cfg, field)
    if field == "lr_warmup_iters":
        return cfg.lr_warmup_iters is not None or cfg.lr_warmup_fraction is not None
    return value != f.default


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plan_resume(cfg, *, iteration: int, saved_schedule: Optional[dict],
                saved_train_state: dict, wanted_schedule: dict, identity: dict[str, Any],
                ckpt: str, saved_optimizer: Optional[dict[str, float]] = None) -> ResumePlan:
    """Decide the resume of ``cfg`` from a checkpoint at ``iteration``; raises
    :class:`ResumeError` naming the flag, both values and the fixes."""
    notes: list[str] = []
    train_iters = wanted_schedule["train_iters"]
    if train_iters < iteration:
        raise ResumeError(
            f"--train-iters {train_iters} is below the iteration of the checkpoint being resumed "
            f"({ckpt} is at iteration {iteration}): there is nothing to train. Pass --train-iters "
            f"above {iteration} to continue, or --finetune to start a new schedule from its "
            "weights")
    saved_gbs = int(saved_train_state.get("data", {}).get("global_batch_size")
                    or cfg.global_batch_size)
    override = bool(getattr(cfg, "override_opt_param_scheduler", False))
    if saved_schedule is not None and not override:
        for key, (flag, field) in SCHEDULE_FLAGS.items():
            if key == "lr_warmup_steps":  # samples, at the checkpoint's batch size
                old = (saved_schedule.get(key) or 0) // saved_gbs
                new = wanted_schedule["warmup_iters"]
            else:
                old, new = saved_schedule.get(key), wanted_schedule[key]
            if old is None or old == new or not _given(cfg, field):
                continue
            raise ResumeError(
                f"{flag} {_fmt(new)} differs from the LR schedule of the checkpoint being "
                f"resumed ({ckpt}: {_fmt(old)}). A resumed run keeps its checkpoint's schedule: "
                f"pass --override-opt-param-scheduler to train with the new values from "
                f"iteration {iteration} on, or drop {flag.split(' /')[0]} to keep the "
                "checkpoint's")
        decay_iters = saved_schedule["lr_decay_steps"] // saved_gbs
        lr_end = (saved_schedule["max_lr"] if saved_schedule["lr_decay_style"] == "constant"
                  else saved_schedule["min_lr"])
        notes.append(
            f"resuming with the checkpoint's LR schedule: lr {_fmt(saved_schedule['max_lr'])} "
            f"({saved_schedule['lr_decay_style']} decay to {_fmt(saved_schedule['min_lr'])} over "
            f"{decay_iters} iterations, {saved_schedule['lr_warmup_steps'] // saved_gbs} of "
            "warm-up)")
        if train_iters > max(decay_iters, iteration):
            notes.append(
                f"--train-iters {train_iters} runs past the end of that schedule (iteration "
                f"{decay_iters}): iterations {max(decay_iters, iteration) + 1}-{train_iters} run "
                f"at lr {_fmt(lr_end)}. Pass --override-opt-param-scheduler to plan the decay "
                f"over {train_iters} iterations instead")
    elif saved_schedule is not None:
        notes.append(f"--override-opt-param-scheduler: the LR schedule of the flags (lr "
                     f"{_fmt(wanted_schedule['max_lr'])}, {wanted_schedule['lr_decay_style']}, "
                     f"{train_iters} iterations) replaces the checkpoint's from iteration "
                     f"{iteration} on")
    optimizer = _plan_optimizer(cfg, saved_optimizer, override, ckpt, iteration, notes)
    position = _data_position(cfg, iteration, saved_train_state, identity, saved_gbs, ckpt,
                              notes)
    return ResumePlan(position, override, notes, optimizer)


def _data_position(cfg, iteration: int, saved: dict, identity: dict, saved_gbs: int, ckpt: str,
                   notes: list[str]) -> int:
    saved_identity = saved.get("data")
    position = int(saved.get("data_position", saved.get("consumed_samples",
                                                        iteration * saved_gbs)))
    if getattr(cfg, "reset_data_position", False):
        notes.append(f"--reset-data-position: the data starts over from its first row (the "
                     f"checkpoint had consumed {position} rows of "
                     f"{(saved_identity or {}).get('data_path', 'its data')})")
        return 0
    if saved_identity is None:
        return position  # a checkpoint from before data identities were saved
    for key, flag in DATA_FLAGS.items():
        old, new = saved_identity.get(key), identity.get(key)
        if key == "stats" and (old is None or new is None):
            continue
        if old != new:
            what = ("the dataset's statistics (it was re-tokenized)" if key == "stats"
                    else f"{flag} {new!r}")
            raise ResumeError(
                f"{what} differs from the checkpoint being resumed ({ckpt}: "
                f"{old!r}): its data position ({position} rows) would point into other data. "
                "Pass --reset-data-position to start this data from its first row (iteration "
                f"and LR schedule continue), or resume with the checkpoint's {flag}")
    if saved_gbs != cfg.global_batch_size:
        notes.append(f"--global-batch-size {cfg.global_batch_size} (the checkpoint used "
                     f"{saved_gbs}): continuing from row {position} of the data")
    return position


def optimizer_layout(*, fsdp: Optional[str], distributed: bool, shards: int,
                     grouped_experts: bool = False) -> dict[str, Any]:
    """How a run's optimizer state is laid out on disk, as checkpoints record it: Megatron-FSDP's
    per-rank shard files (layout-specific: strategy and shard count), the distributed optimizer's
    gathered ``distrib_optim.pt`` (any DP size), or the plain optimizer in the rank file; plus
    ``"experts": "grouped"`` when the routed experts are ``GroupedMMExperts``' 3-D parameters
    (a parameter list of its own, so its state fits no other; without it: one parameter per
    expert and projection, as ``sequential``/``te`` and checkpoints from before it).

    >>> optimizer_layout(fsdp="optim_grads_params", distributed=True, shards=2)
    {'sharding': 'megatron_fsdp', 'strategy': 'optim_grads_params', 'shards': 2}
    >>> optimizer_layout(fsdp=None, distributed=True, shards=1, grouped_experts=True)
    {'sharding': 'distributed', 'experts': 'grouped'}
    """
    if fsdp is not None:
        out = {"sharding": "megatron_fsdp", "strategy": fsdp, "shards": shards}
    else:
        out = {"sharding": "distributed" if distributed else "none"}
    return {**out, "experts": "grouped"} if grouped_experts else out


def _describe_optimizer(layout: dict[str, Any], experts: bool = False) -> str:
    if layout["sharding"] == "megatron_fsdp":
        text = (f"--use-megatron-fsdp --data-parallel-sharding-strategy {layout['strategy']} "
                f"over {layout['shards']} data-parallel rank(s)")
    else:
        text = ("--use-distributed-optimizer" if layout["sharding"] == "distributed"
                else "neither --use-megatron-fsdp nor --use-distributed-optimizer")
    if experts:
        text += (" and the routed experts as one 3-D parameter per projection "
                 "(--moe-experts-impl grouped_mm)" if layout.get("experts") == "grouped" else
                 " and one parameter per routed expert and projection (--moe-experts-impl "
                 "sequential or te, or a checkpoint from before grouped experts)")
    return text


def check_optimizer_layout(saved: Optional[dict[str, Any]], wanted: dict[str, Any],
                           ckpt: str) -> None:
    """The optimizer state of ``ckpt`` loads only into the sharding (and expert parameter form)
    it was saved under; raise :class:`ResumeError` naming both and the two fixes. ``saved``
    ``None``: nothing to check.

    Example: an FSDP run resumed without FSDP -> ``ResumeError: the optimizer state of RUN was
    saved with --use-megatron-fsdp ... but this run uses neither ...``.
    """
    if saved is None or saved == wanted:
        return
    experts = saved.get("experts") != wanted.get("experts")
    raise ResumeError(
        f"the optimizer state of the checkpoint being resumed ({ckpt}) was saved with "
        f"{_describe_optimizer(saved, experts)}, but this run uses "
        f"{_describe_optimizer(wanted, experts)}: it cannot be loaded. Resume with the "
        "checkpoint's setting, or pass --no-load-optim to start the optimizer state fresh "
        "(weights, iteration, LR schedule and data position continue)")


def append_run(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """``run_metadata.json`` keeps every (re)start of a run: the latest record at the top level
    (what tools read) and all of them, oldest first, under ``"runs"``."""
    runs: list = []
    if path.exists():
        try:
            previous = json.loads(path.read_text())
            runs = previous.get("runs") or [{k: v for k, v in previous.items() if k != "runs"}]
        except (ValueError, AttributeError):
            runs = []
    merged = {**record, "runs": runs + [record]}
    return merged
