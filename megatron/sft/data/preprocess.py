"""Pre-tokenise an SFT file into the megatron-core (tokens, loss mask) indexed dataset pair.

Pipeline (streaming, constant memory)::

    reader (main process)      workers (N processes)                       writer (main process)
    raw lines, file:line  ->   parse JSON -> Conversation -> text -> ids+mask  ->  .bin/.idx pair
                  chunks of ``chunk_size`` records, at most ``2N+2`` chunks in flight,
                  results consumed in submission order => identical output for any N.

Example::

    stats = preprocess(PreprocessConfig(input="data/chat.jsonl", tokenizer_model="tok/",
                                         render=RenderConfig(max_length=4096), workers=8))
    # -> data/Tokenized-chat-tok-4096_{text,loss_mask}_document.{bin,idx} + ..._stats.json
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from megatron.sft.data.formats import RecordError
from megatron.sft.data.readers import (
    DEFAULT_MAX_RECORD_BYTES,
    RawRecord,
    iter_records,
    list_input_files,
    parse_payload,
    split_compression,
)
from megatron.sft.data.render import NOTICES, ConversationRenderer, RenderConfig, TokenizedChunk
from megatron.sft.data.stats import PreprocessStats
from megatron.sft.data.tokenizer_fingerprint import tokenizer_fingerprint
from megatron.sft.runtime.disk import disk_full_guard
from megatron.sft.runtime.locks import PrefixLock, remove_stale_temp_files

#: Drops that are a policy decision, not bad input: ``--strict`` does not stop on them.
POLICY_DROPS = ("too_long", "no_loss_tokens")


@dataclass
class PreprocessConfig:
    """Everything one pre-tokenisation run needs."""

    input: str
    """File or folder to read (see ``readers.py`` for the formats)."""
    tokenizer_model: str
    """HF tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``)."""
    output_prefix: str | None = None
    """Output prefix; default ``<input dir>/Tokenized-{dataset}-{tokenizer}-{max_len}``."""
    render: RenderConfig = field(default_factory=RenderConfig)
    workers: int = 1
    """Worker processes; the output is byte-identical for any value."""
    chunk_size: int = 256
    """Records per task sent to a worker."""
    strict: bool = False
    """Stop at the first bad record instead of skipping and counting it."""
    split: str | None = None
    """Split of an HF ``DatasetDict`` folder."""
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    """JSON lines longer than this are dropped (``record_too_large``) without being parsed."""
    progress: bool = True
    force: bool = False
    """Replace a dataset already at the output prefix (made, perhaps, with other options)."""
    max_logged_errors: int = 20
    """Bad records printed one per line; the rest are only counted."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}.")
        if self.chunk_size < 1:
            raise ValueError(f"--chunk-size must be >= 1, got {self.chunk_size}.")
        if self.max_record_bytes < 1:
            raise ValueError(f"--max-record-bytes must be >= 1, got {self.max_record_bytes}.")


class PreprocessError(RuntimeError):
    """A run that must exit non-zero (strict-mode stop, nothing valid, unusable tokenizer)."""


def default_output_prefix(input_path: str, tokenizer_model: str, max_length: int | None) -> str:
    """``assets/data/X/X.json`` + ``ckpt/tok`` + 16384 -> ``assets/data/X/Tokenized-X-tok-16384``.

    A compressed ``X.jsonl.gz`` names the dataset ``X`` as well.
    """
    src = Path(input_path)
    dataset = src.name if src.is_dir() else Path(split_compression(src.name)[0]).stem
    tokenizer = Path(tokenizer_model.rstrip("/")).name
    parts = ["Tokenized", dataset, tokenizer] + ([str(max_length)] if max_length else [])
    folder = src if src.is_dir() else src.parent
    return str(folder / "-".join(parts))


def load_tokenizer(tokenizer_model: str):
    """``AutoTokenizer`` for a local folder (or cached hub name), with an actionable error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_model)
    except Exception as exc:  # OSError, ValueError, JSON errors... all mean "not a tokenizer"
        raise PreprocessError(
            f"cannot load a tokenizer from {tokenizer_model!r} ({type(exc).__name__}: {exc}); pass "
            "the HF model folder that holds tokenizer.json and tokenizer_config.json."
        ) from None


def load_pretokenizer_tokenizer(tokenizer_model: str):
    """The tokenizer pre-tokenization uses: read with ``tokenizers`` alone where that is exact
    (``json_tokenizer``: no transformers import, seconds less start-up), else ``load_tokenizer``."""
    from megatron.sft.data.json_tokenizer import load_json_tokenizer

    try:
        tokenizer = load_json_tokenizer(tokenizer_model)
    except Exception:  # unreadable JSON and the like: let transformers say what is wrong
        tokenizer = None
    return tokenizer if tokenizer is not None else load_tokenizer(tokenizer_model)


# -- worker side ------------------------------------------------------------------------------
_RENDERER: ConversationRenderer | None = None


def _init_worker(tokenizer_model: str, render: RenderConfig, renderer: ConversationRenderer | None = None) -> None:
    """Set the process's renderer: the parent's own when given (inherited by ``fork``, free), else
    built from the tokenizer folder (``spawn``, or one process)."""
    global _RENDERER
    _RENDERER = renderer or ConversationRenderer(load_pretokenizer_tokenizer(tokenizer_model), render)


def process_chunk(payloads: list[Any]) -> TokenizedChunk:
    """Payloads -> the chunk's kept samples, concatenated, and its dropped records.

    Parsing errors and rendering errors are merged into one list in input order.
    """
    assert _RENDERER is not None, "process_chunk runs in a worker set up by _init_worker"
    records, where, errors = [], [], []
    for i, payload in enumerate(payloads):
        try:
            records.append(parse_payload(payload))
            where.append(i)
        except RecordError as err:
            errors.append((i, err.reason, str(err)))
    chunk = _RENDERER.tokenize_chunk(records)
    if errors:
        chunk.errors = sorted(errors + [(where[i], *rest) for i, *rest in chunk.errors])
    else:
        chunk.errors = [(where[i], *rest) for i, *rest in chunk.errors]
    return chunk


# -- main process -----------------------------------------------------------------------------
def _chunks(records: Iterable[RawRecord], size: int) -> Iterator[list[RawRecord]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def _start_workers(workers: int, config: PreprocessConfig, renderer: ConversationRenderer):
    """The pool (None for one worker), its processes started and set up before the clock runs.

    Forked workers inherit ``renderer`` (tokenizer and compiled template) instead of loading
    their own; spawned ones load it in their initializer."""
    if workers == 1:
        _init_worker(config.tokenizer_model, config.render, renderer)
        return None
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    inherited = renderer if method == "fork" else None
    pool = ctx.Pool(workers, _init_worker, (config.tokenizer_model, config.render, inherited))
    pool.map(_ready, range(workers), chunksize=1)  # returns once every worker has set up
    return pool


def _ready(_: int) -> bool:
    return _RENDERER is not None


def _ordered_results(chunks: Iterator[list[RawRecord]], pool, workers: int):
    """Yield ``(chunk, result)`` in input order, with bounded look-ahead (constant memory)."""
    if pool is None:
        for chunk in chunks:
            yield chunk, process_chunk([r.payload for r in chunk])
        return
    with pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(process_chunk, ([r.payload for r in chunk],))))
            if len(pending) >= 2 * workers + 2:
                head, result = pending.popleft()
                yield head, result.get()
        while pending:
            head, result = pending.popleft()
            yield head, result.get()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_no_dataset(prefix: str, force: bool) -> None:
    """Refuse to replace a dataset at ``prefix`` without ``force``: the options that made it
    (``--loss-on``, the prompt style or chat template, ``--seq-length``) may differ from this
    run's, and a training run may be reading it."""
    from megatron.sft.data.indexed_writer import existing_dataset_files

    existing = existing_dataset_files(prefix)
    if existing and not force:
        raise PreprocessError(
            f"{prefix} already holds a tokenized dataset ({', '.join(Path(p).name for p in existing)}), "
            "perhaps made with other options (--loss-on, --prompt-style or the chat template, "
            "--seq-length); nothing was changed. Pass --force (FORCE=1 for "
            "scripts/data/tokenize_dataset.sh) to replace it, or choose another --output-prefix"
        )


def preprocess(config: PreprocessConfig, log: Callable[[str], None] | None = None) -> PreprocessStats:
    """Run the whole pipeline; returns the stats also written to ``<prefix>_stats.json``.

    One writer per prefix: ``PREFIX.lock`` is held while writing (a second run on the same
    prefix stops, naming the first). Under it, an existing dataset is refused unless
    ``config.force``, and the temp files of a run that was killed are removed. A full disk is
    a ``DiskFullError`` naming the folder; nothing half-written is left either way.
    """
    prefix = config.output_prefix or default_output_prefix(
        config.input, config.tokenizer_model, config.render.max_length
    )
    say = log or _stderr
    list_input_files(config.input, config.split)  # InputError for a bad path, before any mkdir
    with PrefixLock.acquire(prefix, "pre-tokenization", say) as lock:
        check_no_dataset(prefix, config.force)  # before anything is touched
        remove_stale_temp_files(prefix, say)
        lock.record_holder()  # again, if a full disk needed those files gone first
        return _preprocess_locked(config, prefix, log)


def _preprocess_locked(config: PreprocessConfig, prefix: str,
                       log: Callable[[str], None] | None) -> PreprocessStats:
    from tqdm import tqdm

    from megatron.sft.data.indexed_writer import IndexedPairWriter

    if config.workers > 1:
        # N processes already use the cores; Rust threads inside each would only contend.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = load_pretokenizer_tokenizer(config.tokenizer_model)
    renderer = ConversationRenderer(tokenizer, config.render)  # fails fast on a bad tokenizer/style pair
    records = iter_records(config.input, config.split, config.max_record_bytes)
    stats = PreprocessStats(input=str(config.input), output_prefix=prefix,
                            tokenizer=config.tokenizer_model, tokenizer_vocab_size=len(tokenizer),
                            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer) or "",
                            seq_length=config.render.max_length, truncate=config.render.truncate)
    bar = tqdm(unit=" samples", disable=not config.progress, dynamic_ncols=True, file=sys.stderr)
    say = log or (lambda msg: bar.write(msg, file=sys.stderr))
    # The clock starts once the writer is open and the workers are ready: like the tokenizer
    # load above, starting processes is set-up, not throughput.
    # The guard is inside the writer: the free space is measured before the writer's abort
    # removes its temp files (a full disk then says "0 B free", not what the abort freed).
    full_disk = disk_full_guard(Path(prefix).parent, None, f"the tokenized dataset {prefix}_*")
    with IndexedPairWriter(prefix, len(tokenizer)) as writer, full_disk:
        pool = _start_workers(config.workers, config, renderer)
        start = time.perf_counter()
        for records_chunk, result in _ordered_results(_chunks(records, config.chunk_size), pool,
                                                       config.workers):
            stats.samples_read += len(records_chunk)
            for i, reason, message in result.errors:
                record = records_chunk[i]
                where = f"{record.source}:{record.line}"
                stats.add_drop(reason, f"{where}: {message}")
                if config.strict and reason not in POLICY_DROPS:
                    raise PreprocessError(
                        f"{where}: {message} [{reason}]. --strict stops at the first bad record; "
                        "drop --strict to skip and count bad records instead."
                    )
                if reason not in POLICY_DROPS and stats.bad_records <= config.max_logged_errors:
                    say(f"warning: {where}: skipped ({reason}): {message}")
                    if stats.bad_records == config.max_logged_errors:
                        say("warning: further bad records are only counted (see the stats JSON)")
            for kind, count in result.notices.items():
                if not stats.notices[kind]:
                    say(f"note: {NOTICES.get(kind, kind)} (counted under 'notices' in the stats JSON)")
                stats.notices[kind] += count
            writer.add_batch(result.ids, result.mask, result.lengths)
            if len(result.ids):
                stats.max_token_id = max(stats.max_token_id, int(np.max(result.ids)))
            stats.add_samples(result.lengths, result.loss_tokens, result.truncated)
            elapsed = time.perf_counter() - start
            bar.update(len(records_chunk))
            bar.set_postfix_str(f"{stats.tokens / max(elapsed, 1e-9):,.0f} tok/s", refresh=False)
        bar.close()
        stats.elapsed_s = time.perf_counter() - start
        stats.token_dtype = np.dtype(writer.token_dtype).name
        if stats.samples_written == 0:
            raise PreprocessError(
                f"no valid sample in {config.input!r}: read {stats.samples_read}, dropped "
                f"{dict(stats.dropped)}; nothing written. Check --format/--prompt-style/--seq-length."
            )
        # the stats are published with the pair, so a dataset never lacks them
        writer.publish_with(stats.write_json(prefix + "_stats.json", publish=False),
                            prefix + "_stats.json")
        writer.commit()
    return stats
