"""Read what ``tools/inspect_sft_data.py`` shows, decode it token by token, draw ``--plot``.

Two sources, one preview:

- ``PrefixSource``: a tokenized prefix (``<prefix>_{text,loss_mask}_document.{bin,idx}`` +
  ``_stats.json``), read with ``indexed_reader`` (numpy, no torch) and decoded with the
  ``tokenizers`` library alone, so a preview starts in about a second;
- ``RawSource``: a raw file before tokenizing, through the pre-tokenizer's own parts in its
  order (``readers.iter_records`` -> ``readers.parse_payload`` -> ``render.ConversationRenderer``
  with the same ``RenderConfig``), so it shows the very ids and mask ``preprocess`` would write.
  A record the pre-tokenizer would drop is shown as dropped, with its reason.

Records of a raw file are numbered from 0 in file order, dropped ones included; samples of a
prefix are numbered as training reads them (dropped records are not there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from megatron.sft.data.formats import RecordError
from megatron.sft.data.indexed_reader import open_indexed_pair, strip_suffix
from megatron.sft.data.inspect import (
    DEFAULT_SAMPLES,
    Histograms,
    histograms,
    learned_per_sample,
    pick_indices,
    render_segments,
    reservoir_sample,
    sample_counts,
    segments,
    token_pieces,
)
from megatron.sft.data.validation import read_stats


@dataclass
class PreviewSample:
    """One sample to show: ``ids`` and ``mask`` are None for a record the pre-tokenizer drops."""

    title: str
    """``"sample 3 of 400"`` or ``"record 3 (chat.jsonl:4)"``."""
    ids: np.ndarray | None
    mask: np.ndarray | None
    note: str = ""


# -- tokenizer --------------------------------------------------------------------------------
def load_decoder(tokenizer_model: str, recorded_in: str | None = None):
    """The ``tokenizers.Tokenizer`` of an HF folder: read from its ``tokenizer.json`` directly
    (no ``transformers`` import), else through ``AutoTokenizer`` (e.g. a cached hub name)."""
    file = Path(tokenizer_model) / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(file))
    from megatron.sft.data.preprocess import PreprocessError, load_tokenizer

    try:
        return load_tokenizer(tokenizer_model).backend_tokenizer
    except PreprocessError as exc:
        where = f" (the tokenizer recorded in {recorded_in})" if recorded_in else ""
        raise ValueError(f"{exc}{where}; pass --tokenizer-model DIR") from None


def decode_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Per token the text it adds, decoded one by one (``inspect.token_pieces``), specials shown."""
    from tokenizers.decoders import DecodeStream

    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if len(ids) and int(np.max(ids)) >= vocab:
        raise ValueError(f"token id {int(np.max(ids))} is not in the tokenizer ({vocab} tokens): the "
                         "data was tokenized with another tokenizer; pass that one as --tokenizer-model")
    stream = DecodeStream(skip_special_tokens=False)
    return token_pieces(ids, lambda i: stream.step(tokenizer, i))


def format_sample(sample: PreviewSample, tokenizer: Any, color: bool) -> str:
    """A header line with the counts, then the text with the learned tokens highlighted."""
    if sample.ids is None:
        return f"=== {sample.title}: {sample.note} ==="
    counts = sample_counts(sample.mask)
    note = f"; {sample.note}" if sample.note else ""
    text = render_segments(segments(decode_pieces(tokenizer, sample.ids), sample.mask), color)
    return f"=== {sample.title}: {counts.describe()}{note} ===\n{text}"


# -- a tokenized prefix -----------------------------------------------------------------------
class PrefixSource:
    """Samples of a tokenized prefix, as training reads them."""

    def __init__(self, prefix: str, tokenizer_model: str | None = None):
        self.prefix = strip_suffix(prefix)
        self.text, self.mask = open_indexed_pair(self.prefix)
        self.stats = read_stats(self.prefix) or {}
        recorded = self.stats.get("tokenizer")
        if not tokenizer_model and not recorded:
            raise ValueError(f"{self.prefix}_stats.json records no tokenizer (or is missing); pass "
                             "--tokenizer-model DIR, the tokenizer the data was made with")
        self.tokenizer_model = tokenizer_model or recorded
        self.tokenizer = load_decoder(self.tokenizer_model,
                                      None if tokenizer_model else f"{self.prefix}_stats.json")

    def describe(self) -> str:
        lengths = self.text.sequence_lengths
        learned = self.stats.get("loss_tokens")
        share = f" ({learned:,} learned, {100 * learned / max(int(lengths.sum()), 1):.1f}%)" if learned else ""
        mask = "" if self.mask is not None else "; no loss mask: every token is learned (pretraining data)"
        return (f"{self.prefix}: {len(lengths):,} samples, {int(lengths.sum()):,} tokens{share}; "
                f"tokenizer {self.tokenizer_model}{mask}")

    def preview(self, index: Sequence[int] | None, random_n: int | None, seed: int) -> list[PreviewSample]:
        n = len(self.text)
        out = []
        for i in pick_indices(n, index, random_n, seed, what=f"samples in {self.prefix}"):
            ids = self.text[i]
            mask = self.mask[i] if self.mask is not None else np.ones(len(ids), np.uint8)
            out.append(PreviewSample(f"sample {i} of {n:,}", ids, mask))
        return out

    def histograms(self, seq_length: int | None = None) -> Histograms:
        """Every sample's length (from the index) and learned tokens (one pass over the mask)."""
        lengths = self.text.sequence_lengths.astype(np.int64)
        if self.mask is None:
            learned = lengths
        else:
            learned = learned_per_sample(self.mask.all_tokens(), lengths)
        return histograms(lengths, learned, seq_length or self.stats.get("seq_length"))

    def plot_note(self) -> str:
        dropped = (self.stats.get("dropped_by_reason") or {}).get("too_long", 0)
        truncated = self.stats.get("samples_truncated", 0)
        parts = [f"{dropped:,} longer samples dropped" if dropped else "",
                 f"{truncated:,} truncated" if truncated else ""]
        return " and ".join(p for p in parts if p) + (" by the pre-tokenizer" if any(parts) else "")


# -- a raw file -------------------------------------------------------------------------------
class RawSource:
    """Records of a raw file rendered as the pre-tokenizer renders them."""

    def __init__(self, input_path: str, tokenizer_model: str, render, split: str | None = None,
                 max_record_bytes: int | None = None):
        from megatron.sft.data.preprocess import PreprocessError, load_tokenizer
        from megatron.sft.data.readers import DEFAULT_MAX_RECORD_BYTES, list_input_files
        from megatron.sft.data.render import ConversationRenderer

        list_input_files(input_path, split)  # InputError (a ValueError) for a bad path, first
        self.input, self.split, self.render = input_path, split, render
        self.max_record_bytes = max_record_bytes or DEFAULT_MAX_RECORD_BYTES
        self.tokenizer_model = tokenizer_model
        try:
            self.hf_tokenizer = load_tokenizer(tokenizer_model)
        except PreprocessError as exc:
            raise ValueError(str(exc)) from None
        self.renderer = ConversationRenderer(self.hf_tokenizer, render)
        self.tokenizer = self.renderer.backend  # the very tokenizer that encodes

    def describe(self) -> str:
        r = self.render
        limit = f", --seq-length {r.max_length}{' --truncate' if r.truncate else ''}" if r.max_length else ""
        return (f"{self.input} rendered as the pre-tokenizer would (--prompt-style {r.prompt_style}, "
                f"--loss-on {r.loss_on}{limit}) with {self.tokenizer_model}; records numbered from 0 "
                "in file order")

    def _records(self) -> Iterator:
        from megatron.sft.data.readers import iter_records

        return iter_records(self.input, self.split, self.max_record_bytes)

    def _picked(self, index: Sequence[int] | None, random_n: int | None, seed: int) -> list:
        if random_n is not None:
            if index:
                raise ValueError("give --index or --random, not both.")
            return reservoir_sample(self._records(), random_n, seed)[0]
        wanted = set(index or range(DEFAULT_SAMPLES))
        found = {i: r for i, r in enumerate(islice(self._records(), max(wanted) + 1)) if i in wanted}
        if index and len(found) < len(wanted):
            count = sum(1 for _ in self._records())
            pick_indices(count, index, what=f"records in {self.input}")  # raises, naming the range
        return [(i, found[i]) for i in (index or sorted(wanted)) if i in found]

    def preview(self, index: Sequence[int] | None, random_n: int | None, seed: int) -> list[PreviewSample]:
        from megatron.sft.data.readers import parse_payload

        out = []
        for i, raw in self._picked(index, random_n, seed):
            title = f"record {i} ({os.path.basename(raw.source)}:{raw.line})"
            try:
                [result] = self.renderer.render_batch([parse_payload(raw.payload)])
            except RecordError as err:
                result = err
            if isinstance(result, RecordError):
                out.append(PreviewSample(title, None, None,
                                         f"dropped by the pre-tokenizer ({result.reason}): {result}"))
                continue
            note = f"truncated to --seq-length {self.render.max_length}" if result.truncated else ""
            out.append(PreviewSample(title, result.ids, result.mask, note))
        return out

    def histograms(self, seq_length: int | None = None, max_records: int = 5000,
                   chunk: int = 256) -> tuple[Histograms, str]:
        """Lengths and learned tokens of the first ``max_records`` records, rendered without a
        length limit so the plot shows what ``seq_length`` would cut; and a note of the rest."""
        from megatron.sft.data.readers import parse_payload
        from megatron.sft.data.render import ConversationRenderer

        unlimited = ConversationRenderer(self.hf_tokenizer, replace(self.render, max_length=None,
                                                                    truncate=False))
        lengths, learned, read, bad = [], [], 0, 0
        records = islice(self._records(), max_records)
        while batch := list(islice(records, chunk)):
            read += len(batch)
            parsed = []
            for raw in batch:
                try:
                    parsed.append(parse_payload(raw.payload))
                except RecordError:
                    bad += 1
            result = unlimited.tokenize_chunk(parsed)
            bad += len(result.errors)
            lengths.append(result.lengths)
            learned.append(result.loss_tokens)
        if not lengths or not sum(len(x) for x in lengths):
            raise ValueError(f"no record of {self.input} renders to a sample ({bad} of {read} "
                             "dropped); check --format/--prompt-style")
        hist = histograms(np.concatenate(lengths), np.concatenate(learned),
                          seq_length or self.render.max_length)
        note = (f"first {read:,} records, rendered without a length limit"
                + (f"; {bad:,} dropped for other reasons" if bad else ""))
        return hist, note


# -- the plot ---------------------------------------------------------------------------------
def write_plot(path: str, hist: Histograms, title: str, note: str = "") -> None:
    """Two histograms side by side: sample lengths with the ``MAX_LEN`` cut-off as a red dashed
    line, and the learned share per sample with its median. Written atomically (temp + rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_len, ax_share) = plt.subplots(1, 2, figsize=(11, 4.2))
    widths = np.diff(hist.length_edges)
    ax_len.bar(hist.length_edges[:-1], hist.length_counts, width=widths, align="edge",
               color="tab:blue", edgecolor="white", linewidth=0.4)
    if hist.seq_length:
        over = f" ({hist.over:,} longer)" if hist.over else ""
        ax_len.axvline(hist.seq_length, color="tab:red", linestyle="--", linewidth=1.5,
                       label=f"MAX_LEN {hist.seq_length:,}{over}")
        ax_len.legend(loc="best")
    ax_len.set_xlabel("tokens per sample")
    ax_len.set_ylabel("samples")
    ax_len.set_title(f"sample lengths (median {hist.median_length:,.0f}, max {hist.max_length:,})")
    ax_len.grid(alpha=0.3)
    edges = 100 * hist.share_edges
    ax_share.bar(edges[:-1], hist.share_counts, width=np.diff(edges), align="edge",
                 color="tab:green", edgecolor="white", linewidth=0.4)
    ax_share.axvline(100 * hist.median_share, color="black", linestyle=":", linewidth=1.2,
                     label=f"median {100 * hist.median_share:.1f}%")
    ax_share.legend(loc="best")
    ax_share.set_xlim(0, 100)
    ax_share.set_xlabel("learned tokens (loss mask 1), % of the sample")
    ax_share.set_ylabel("samples")
    ax_share.set_title("learned share per sample")
    ax_share.grid(alpha=0.3)
    fig.suptitle(f"{title}: {hist.samples:,} samples" + (f" ({note})" if note else ""), fontsize=10)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
