"""What a sample teaches, made visible: learned spans, their text with markers or colour,
per-sample counts and histogram data. The pure half of ``tools/inspect_sft_data.py``
(``inspect_io`` reads the files and draws the plot).

Worked example (ChatML, one piece per token for readability)::

    pieces  <|im_start|> user \\n Hi <|im_end|> \\n <|im_start|> assistant \\n Hello <|im_end|> \\n
    index        0        1    2  3      4      5       6          7      8    9       10     11
    mask         0        0    0  0      0      0       0          0      0    1       1      0

    mask_runs(mask)                  -> [(9, 11)]
    segments(pieces, mask)           -> [Segment("<|im_start|>user\\nHi...assistant\\n", False),
                                         Segment("Hello<|im_end|>", True), Segment("\\n", False)]
    render_segments(segs, color=False) -> "<|im_start|>user\\nHi...assistant\\n[[Hello<|im_end|>]]\\n"
    sample_counts(mask)              -> SampleCounts(tokens=12, learned=2, learned_turns=1)

Turns are counted from the loss mask, not from the chat structure: a *learned turn* is one
maximal run of mask 1. An assistant turn and its end-of-turn token form one run, and the prompt
tokens of the next user turn separate it from the next one, so with ``--loss-on assistant``
the count is the number of learned assistant turns. A tokenized prefix no longer holds the
conversation, so this is the one count both preview modes can give alike. (``--loss-on all``
gives one run per sample, or one per gap a ``loss: false`` turn or a tool result leaves.)

``[[``/``]]`` mark learned text when colour is off; a text that itself contains ``[[`` is then
ambiguous to the eye (use ``--color always`` and ``less -R``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

import numpy as np

LEARNED_OPEN, LEARNED_CLOSE = "[[", "]]"
#: black on green: a learned space or tab stays visible
ANSI_LEARNED, ANSI_RESET = "\x1b[30;42m", "\x1b[0m"
COLOR_CHOICES = ("auto", "always", "never")
DEFAULT_SAMPLES = 3

T = TypeVar("T")


# -- spans and text ---------------------------------------------------------------------------
def mask_runs(mask: Sequence[int] | np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of mask 1 as ``[start, stop)`` token ranges: ``[0, 1, 1, 0, 1]`` -> ``[(1, 3), (4, 5)]``."""
    m = np.asarray(mask).astype(bool).astype(np.int8)
    edges = np.diff(np.concatenate(([0], m, [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def token_pieces(ids: Iterable[int], step: Callable[[int], str | None]) -> list[str]:
    """Per token, the text it adds when the ids are decoded one by one.

    ``step`` is a streaming decoder (``tokenizers.decoders.DecodeStream.step``): it returns
    ``None`` while a character's UTF-8 bytes are incomplete, so a character split over several
    byte-level tokens belongs to the token that completes it; the others get ``""``. The pieces
    join to the text a whole-sequence decode gives. Example: ``"é"`` as bytes ``C3 A9`` in two
    tokens -> ``["", "é"]``.
    """
    return [step(int(i)) or "" for i in ids]


@dataclass(frozen=True)
class Segment:
    """Consecutive tokens with the same mask value, as text."""

    text: str
    learned: bool


def segments(pieces: Sequence[str], mask: Sequence[int] | np.ndarray) -> list[Segment]:
    """Token pieces + mask -> alternating learned / not learned text segments (see the module example)."""
    if len(pieces) != len(mask):
        raise ValueError(f"{len(pieces)} token pieces but a loss mask of {len(mask)}: they must align")
    out: list[Segment] = []
    cursor = 0
    for start, stop in mask_runs(mask):
        if start > cursor:
            out.append(Segment("".join(pieces[cursor:start]), False))
        out.append(Segment("".join(pieces[start:stop]), True))
        cursor = stop
    if cursor < len(pieces):
        out.append(Segment("".join(pieces[cursor:]), False))
    return out


def render_segments(segs: Iterable[Segment], color: bool) -> str:
    """The sample's text with learned segments as ``[[…]]`` or, with ``color``, in ANSI colour.

    In colour each line of a learned segment is wrapped on its own, so a pager that resets
    attributes at line ends (``less -R``) still shows it: ``"a\\nb"`` learned ->
    ``"\\x1b[30;42ma\\x1b[0m\\n\\x1b[30;42mb\\x1b[0m"``.
    """
    parts = []
    for seg in segs:
        if not seg.learned:
            parts.append(seg.text)
        elif not color:
            parts.append(LEARNED_OPEN + seg.text + LEARNED_CLOSE)
        else:
            parts.append("\n".join(ANSI_LEARNED + line + ANSI_RESET if line else ""
                                   for line in seg.text.split("\n")))
    return "".join(parts)


def marked_spans(text: str) -> list[str]:
    """The inverse of ``render_segments(color=False)`` for a text without other ``[[``: the
    learned segments, in order. ``"a[[b]]c[[d]]"`` -> ``["b", "d"]``."""
    out, cursor = [], 0
    while (start := text.find(LEARNED_OPEN, cursor)) >= 0:
        stop = text.find(LEARNED_CLOSE, start + len(LEARNED_OPEN))
        if stop < 0:
            raise ValueError(f"unclosed {LEARNED_OPEN} at character {start}")
        out.append(text[start + len(LEARNED_OPEN):stop])
        cursor = stop + len(LEARNED_CLOSE)
    return out


def use_color(choice: str, is_tty: bool, environ: Mapping[str, str]) -> bool:
    """``--color``: ``always``/``never``, or ``auto`` = a terminal, no ``NO_COLOR``, ``TERM`` not dumb."""
    if choice not in COLOR_CHOICES:
        raise ValueError(f"--color {choice!r} is unknown; choose one of {COLOR_CHOICES}.")
    if choice != "auto":
        return choice == "always"
    return is_tty and "NO_COLOR" not in environ and environ.get("TERM", "") != "dumb"


# -- counts -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleCounts:
    tokens: int
    learned: int
    """Tokens with loss mask 1."""
    learned_turns: int
    """Maximal runs of mask 1 (see the module docstring)."""

    @property
    def share(self) -> float:
        return self.learned / self.tokens if self.tokens else 0.0

    def describe(self) -> str:
        """``"12 tokens, 2 learned (16.7%), 1 learned turn"``."""
        turns = "turn" if self.learned_turns == 1 else "turns"
        return (f"{self.tokens:,} tokens, {self.learned:,} learned ({100 * self.share:.1f}%), "
                f"{self.learned_turns} learned {turns}")


def sample_counts(mask: Sequence[int] | np.ndarray) -> SampleCounts:
    m = np.asarray(mask)
    return SampleCounts(int(m.size), int(np.count_nonzero(m)), len(mask_runs(m)))


# -- which samples ----------------------------------------------------------------------------
def pick_indices(count: int, index: Sequence[int] | None = None, random_n: int | None = None,
                 seed: int = 0, what: str = "samples") -> list[int]:
    """``--index`` as given (each checked), ``--random N`` (sorted, seeded), else the first few.

    Example: ``pick_indices(400, random_n=3, seed=0)`` is the same 3 numbers on every run;
    ``pick_indices(400, index=[400])`` raises, naming the range ``0..399``.
    """
    if index and random_n is not None:
        raise ValueError("give --index or --random, not both.")
    if index:
        bad = [i for i in index if not 0 <= i < count]
        if bad:
            raise ValueError(f"--index {' '.join(map(str, bad))} is out of range: there are {count:,} "
                             f"{what} (0..{count - 1}); pick numbers in that range.")
        return list(index)
    if random_n is not None:
        if random_n < 1:
            raise ValueError(f"--random must be at least 1, got {random_n}.")
        return sorted(random.Random(seed).sample(range(count), min(random_n, count)))
    return list(range(min(DEFAULT_SAMPLES, count)))


def reservoir_sample(items: Iterable[T], k: int, seed: int = 0) -> tuple[list[tuple[int, T]], int]:
    """``k`` items drawn uniformly in one pass (the count is unknown up front), as
    ``(position, item)`` sorted by position, and how many items there were.

    Example: ``reservoir_sample("abcdef", 2, seed=1)`` -> ``([(i, x), (j, y)], 6)``, the same on every run.
    """
    if k < 1:
        raise ValueError(f"--random must be at least 1, got {k}.")
    rng = random.Random(seed)
    kept: list[tuple[int, T]] = []
    n = 0
    for n, item in enumerate(items, 1):
        if len(kept) < k:
            kept.append((n - 1, item))
        elif (j := rng.randrange(n)) < k:
            kept[j] = (n - 1, item)
    return sorted(kept, key=lambda t: t[0]), n


# -- histograms -------------------------------------------------------------------------------
def learned_per_sample(mask: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Learned tokens per sample from the samples' masks back to back.

    Example: mask ``[0, 1, 1, 0, 1]``, lengths ``[3, 2]`` -> ``[2, 1]``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if int(lengths.sum()) != len(mask):
        raise ValueError(f"the lengths sum to {int(lengths.sum())} tokens but the mask has {len(mask)}")
    out = np.zeros(len(lengths), dtype=np.int64)
    nonempty = lengths > 0
    if nonempty.any():
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))[nonempty]
        # summed as int64 without an int64 copy: a memory-mapped uint8 mask streams through
        out[nonempty] = np.add.reduceat(np.asarray(mask), starts, dtype=np.int64)
    return out


@dataclass(frozen=True)
class Histograms:
    """What ``--plot`` draws, computed without matplotlib."""

    length_edges: np.ndarray
    length_counts: np.ndarray
    share_edges: np.ndarray
    share_counts: np.ndarray
    seq_length: int | None
    """The ``MAX_LEN`` cut-off, drawn as a line; None when unknown."""
    over: int
    """Samples longer than ``seq_length`` (0 when it is None)."""
    samples: int
    median_length: float
    max_length: int
    median_share: float

    def summary(self) -> str:
        """``"400 samples: length median 27, max 48; MAX_LEN 128: 0 longer; learned share median 33.3%"``."""
        cut = ("MAX_LEN unknown (pass --seq-length)" if self.seq_length is None else
               f"MAX_LEN {self.seq_length:,}: {self.over:,} longer")
        return (f"{self.samples:,} samples: length median {self.median_length:,.0f}, max "
                f"{self.max_length:,}; {cut}; learned share median {100 * self.median_share:.1f}%")


def histograms(lengths: np.ndarray, learned: np.ndarray, seq_length: int | None = None,
               length_bins: int = 50, share_bins: int = 20) -> Histograms:
    """Sample lengths in about ``length_bins`` bins of whole tokens from 0 past the larger of the
    longest sample and ``seq_length``; learned share (learned / tokens) on ``share_bins`` bins over [0, 1].

    Example: lengths ``[10, 30]``, learned ``[5, 3]``, ``seq_length`` 20 -> ``over`` 1,
    shares ``[0.5, 0.1]``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    learned = np.asarray(learned, dtype=np.int64)
    if len(lengths) != len(learned):
        raise ValueError(f"{len(lengths)} lengths but {len(learned)} learned counts")
    if len(lengths) == 0:
        raise ValueError("no samples to plot")
    top = max(int(lengths.max()), seq_length or 0, 1)
    # whole-token bins [k, k + width): equal-width float bins would leave gaps between integers
    width = -(-top // length_bins)
    length_counts, length_edges = np.histogram(lengths, bins=np.arange(0, top + 2 * width, width))
    shares = learned / np.maximum(lengths, 1)
    share_counts, share_edges = np.histogram(shares, bins=share_bins, range=(0.0, 1.0))
    over = int(np.count_nonzero(lengths > seq_length)) if seq_length else 0
    return Histograms(length_edges, length_counts, share_edges, share_counts, seq_length, over,
                      len(lengths), float(np.median(lengths)), int(lengths.max()),
                      float(np.median(shares)))
