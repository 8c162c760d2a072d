"""What a training run checks before its first step, so that nothing goes silently wrong.

- ``acquire_run_lock``: one run per ``--save`` directory. Rank 0 takes the lock before any
  rank writes and tells every rank the outcome, so a refused run stops all ranks with the same
  error (naming the holder) instead of some ranks hanging or writing. Partials left in
  ``--save`` by a killed run are removed (only the lock holder writes there).
- ``check_training_data``: token ids against the model's vocabulary (from the pre-tokenizer's
  stats, plus a per-row backstop), samples longer than ``max_position_embeddings`` (a warning,
  an error with ``--strict``), and the training objective, printed and recorded in
  ``SAVE/run_metadata.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from megatron.sft.data.indexed_writer import LOSS_MASK_SUFFIX, TEXT_SUFFIX
from megatron.sft.data.validation import (
    DataValidationError,
    ModelVocabulary,
    VocabularyGuard,
    check_token_ids,
    dropped_long_samples,
    long_sample_report,
    read_stats,
)
from megatron.sft.training.resume import append_run
from megatron.sft.runtime.locks import (
    DirectoryLock,
    LockedError,
    remove_stale_partials,
    this_host,
    unwritable_reason,
)

RUN_METADATA_FILE = "run_metadata.json"
#: above this share of the loss tokens in samples longer than --seq-length, training refuses
#: to start without --allow-dropping-long-samples
MAX_DROPPED_LOSS_SHARE = 0.05


def _say(message: str) -> None:
    print(message, flush=True)


def acquire_run_lock(save: Optional[str]) -> Optional[DirectoryLock]:
    """Lock ``save`` on global rank 0; raise ``LockedError`` on every rank if that fails."""
    import torch.distributed as dist

    if not save:
        return None
    lock, error = None, None
    if dist.get_rank() == 0:
        try:
            lock = DirectoryLock.acquire(save, "training run", _say)
            remove_stale_partials(save, _say, locked_iterations=True)
            lock.record_holder()  # again, if a full disk needed the partials gone first
        except LockedError as exc:
            error = str(exc)
        except Exception as exc:  # e.g. no permission: still every rank must hear of it
            error = (unwritable_reason("--save", save, exc) if isinstance(exc, OSError)
                     else f"cannot lock --save {save}: {type(exc).__name__}: {exc}")
            if lock is not None:
                lock.release()
    outcome = [error]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise LockedError(outcome[0])
    return lock


def check_save_directory(cfg, start: int = 0) -> None:
    """Never replace an iteration a training run did not write: a ``--save`` that holds a
    converted (or resharded) iteration this run would save over is refused before the first
    step, on every rank. Such iterations are never pruned either (``--keep-last``), so a
    converted base in ``--save`` and the LoRA runs that name it stay intact. ``start``: the
    iteration the run resumes at (it saves only later ones)."""
    import torch.distributed as dist

    from megatron.sft.bridge.checkpoint_io import read_metadata, written_by_training
    from megatron.sft.runtime.collective import on_every_rank

    if not cfg.save:
        return

    def check() -> None:
        if dist.get_rank() != 0 or not Path(cfg.save).is_dir():
            return
        for it_dir in sorted(Path(cfg.save).glob("iter_*")):
            if not it_dir.is_dir() or it_dir.name.endswith("partial"):
                continue
            if not (it_dir / "sft_metadata.json").exists() or written_by_training(it_dir):
                continue
            n = int(it_dir.name.split("_")[1])
            if _would_save_at(cfg, n, start):
                producer = read_metadata(it_dir).producer or "a converter"
                raise ValueError(
                    f"--save {cfg.save} holds {it_dir.name}, written by {producer} (not by a "
                    f"training run), and this run would save iteration {n} over it. A run "
                    "never replaces a checkpoint it did not write (it may be the base you "
                    "--load, or one a LoRA run names): pass another --save directory, e.g. "
                    f"--save {Path(cfg.save).name}_sft")

    on_every_rank(check)


def _would_save_at(cfg, n: int, start: int = 0) -> bool:
    """Whether a run of ``cfg`` that starts at iteration ``start`` may save iteration ``n``:
    one it trains (after ``start``) that is a --save-interval or --exit-interval multiple, or
    the last.

    Example: ``--save-interval 1 --train-iters 8`` from iteration 6 saves 7 and 8, never 1."""
    last = cfg.train_iters
    if n <= max(start, 0) or (last is not None and n > last):
        return False
    return (n == last or last is None
            or any(k and n % k == 0 for k in (cfg.save_interval, cfg.exit_interval,
                                              getattr(cfg, "save_hf_interval", None))))


def model_tokenizer_dir(trainer) -> Optional[Path]:
    """Where the model's tokenizer is: the ``--load`` HF directory, or what a checkpoint's
    exports copy theirs from (``SAVE/hf_reference``, else the HF directory it was made from)."""
    from megatron.sft.training.hf_output import reference_dir

    source = getattr(trainer, "source", None)
    if source is None:
        return None
    if source.hf_load:
        return Path(trainer.cfg.load)
    return reference_dir(trainer.cfg.load, trainer.meta)


def check_tokenizer(trainer, stats: Optional[dict], prefix: str) -> list[str]:
    """The data's tokenizer (its fingerprint in ``_stats.json``) must be the model's: the same
    vocabulary size is not enough. A mismatch is an error, or a warning (returned) with
    ``--allow-tokenizer-mismatch``. Data or models that record no fingerprint are not compared."""
    from megatron.sft.data.tokenizer_fingerprint import directory_fingerprint

    recorded = (stats or {}).get("tokenizer_fingerprint")
    where = model_tokenizer_dir(trainer) if recorded else None
    model = directory_fingerprint(where) if where is not None else None
    if not recorded or model is None or model == recorded:
        return []
    message = (
        f"{prefix} was tokenized with {stats.get('tokenizer')} (tokenizer {recorded}), but the "
        f"model's tokenizer in {where} is another one ({model}; the vocabulary size may "
        "match, the tokens do not): the data's ids would mean other text to this model, and "
        f"exports would ship {where}'s tokenizer")
    if not getattr(trainer.cfg, "allow_tokenizer_mismatch", False):
        raise DataValidationError(
            f"{message}. Re-tokenize the data with {where} (scripts/data/tokenize_dataset.sh), "
            "or pass --allow-tokenizer-mismatch if the two are meant to differ")
    return [f"{message} (--allow-tokenizer-mismatch)"]


def objective_of(train_ds) -> tuple[str, str]:
    """``("assistant-only" | "every-token", a sentence for the log)``."""
    prefix = train_ds.prefix
    if train_ds.pretraining:
        return "every-token", (
            f"training objective: every token (continued pretraining): {prefix} has no "
            f"{LOSS_MASK_SUFFIX}.bin/.idx, so the loss covers all tokens, prompts included. For "
            "assistant-only SFT, pre-tokenize with scripts/data/tokenize_dataset.sh")
    stats = read_stats(prefix) or {}
    share = (f" ({stats['loss_tokens']} of {stats['tokens']} tokens)"
             if stats.get("tokens") else "")
    return "assistant-only", (
        f"training objective: assistant-only: loss on the tokens marked in "
        f"{prefix}{LOSS_MASK_SUFFIX}{share}")


def check_training_data(trainer) -> dict[str, Any]:
    """Validate ``trainer``'s datasets against its model, arm the per-row vocabulary check, log
    the objective and (rank 0, with ``--save``) write ``run_metadata.json``; returns it."""
    import torch.distributed as dist

    cfg, shape, meta = trainer.cfg, trainer.shape, trainer.meta
    rank, world = ((dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1))
    strict = getattr(cfg, "strict", False)
    vocab = ModelVocabulary(shape.vocab_size, meta.padded_vocab_size, f"the model in {cfg.load}")
    warnings: list[str] = []
    checked: dict[str, Optional[dict]] = {}
    for ds in (trainer.train_ds, trainer.valid_ds):
        if ds is None:
            continue
        if ds.prefix not in checked:
            checked[ds.prefix] = read_stats(ds.prefix)
            warnings += check_token_ids(ds.text, ds.prefix, vocab, checked[ds.prefix])
        ds.vocab_guard = VocabularyGuard(vocab, ds.prefix + TEXT_SUFFIX + ".bin",
                                         checked[ds.prefix])
        report = long_sample_report(ds.positions, shape.max_position_embeddings, ds.name,
                                    cfg.seq_length)
        if report and strict:
            raise DataValidationError(f"{ds.prefix}: {report}. --strict makes this an error")
        if report:
            warnings.append(f"{ds.prefix}: {report}; --strict makes this an error")
    warnings += check_tokenizer(trainer, checked.get(trainer.train_ds.prefix),
                                trainer.train_ds.prefix)
    dropped = dropped_long_samples(trainer.train_ds)
    if dropped is not None:
        about = "about " if dropped["estimated"] else ""
        sentence = (
            f"{dropped['samples']} of {dropped['of']} training samples "
            f"({dropped['sample_share']:.1%}) are longer than --seq-length {cfg.seq_length} and "
            f"are skipped: {about}{dropped['loss_token_share']:.1%} of the loss tokens")
        if dropped["loss_token_share"] > MAX_DROPPED_LOSS_SHARE and \
                not cfg.allow_dropping_long_samples:
            longest = (read_stats(trainer.train_ds.prefix) or {}).get("max_sample_tokens")
            raise DataValidationError(
                f"{sentence}. That is more than {MAX_DROPPED_LOSS_SHARE:.0%}: raise --seq-length "
                f"(the longest sample has {longest or 'more'} tokens; e.g. the MAX_LEN the data "
                "was tokenized with), or pass --allow-dropping-long-samples to train on the "
                "rest")
        warnings.append(sentence)
    for warning in warnings:
        trainer.log(f"warning: {warning}")
    objective, sentence = objective_of(trainer.train_ds)
    trainer.log(sentence)
    stats = checked.get(trainer.train_ds.prefix) or {}
    record = {
        "objective": objective,
        "loss_mask": None if trainer.train_ds.pretraining
        else trainer.train_ds.prefix + LOSS_MASK_SUFFIX,
        "data_path": cfg.data_path, "valid_data_path": cfg.valid_data_path, "load": cfg.load,
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": this_host(), "pid": os.getpid(), "world_size": world,
        "command": " ".join(sys.argv),
        "model_vocab_size": vocab.size, "padded_vocab_size": vocab.padded,
        "max_token_id": stats.get("max_token_id"), "tokenizer": stats.get("tokenizer"),
        "tokenizer_vocab_size": stats.get("tokenizer_vocab_size"),
        "max_position_embeddings": shape.max_position_embeddings, "warnings": warnings,
        "dropped_long_samples": dropped,
    }
    if cfg.save and rank == 0:
        path = Path(cfg.save) / RUN_METADATA_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(append_run(path, record), indent=2) + "\n")
        os.replace(tmp, path)
    return record
