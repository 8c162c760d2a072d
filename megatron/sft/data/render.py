"""Conversation -> token ids + loss mask, in batches, with the tokenizer's offset mapping.

The rendered text is tokenised *once, whole* (as at inference time); the mask is then derived
from character spans: a token is learned when it overlaps an assistant span. With a chat template
the end-of-turn token directly after the assistant content (``<|im_end|>``, ``<|eot_id|>``,
``<｜end▁of▁sentence｜>`` …) is learned as well, so the model learns to stop.

Worked example (ChatML, one token per piece for readability)::

    text   <|im_start|> user \\n Hi <|im_end|> \\n <|im_start|> assistant \\n Hello <|im_end|> \\n
    mask        0        0    0  0      0      0       0          0      0    1       1      0

The end-of-turn rule: the one special token that starts exactly where the assistant content ends,
unless that token is a role header (a special token seen right before some message's content,
e.g. ``<｜User｜>`` in DeepSeek templates) or the BOS token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Sequence

import numpy as np

from megatron.sft.data.chat_template import ChatTemplate, render_chat_template
from megatron.sft.data.formats import FieldMap, RecordError, to_conversation
from megatron.sft.data.prompt_styles import PROMPT_STYLES, RenderedText, render_alpaca, render_chatml

LOSS_ON = ("assistant", "last-assistant", "all")


@dataclass(frozen=True)
class RenderConfig:
    """How records become samples (one config for the rendering concern)."""

    prompt_style: str = "chat-template"
    """``chat-template`` (the tokenizer's own), ``alpaca`` or ``chatml``."""
    loss_on: str = "assistant"
    """``assistant``: every assistant turn; ``last-assistant``: the final one; ``all``: every token."""
    max_length: int | None = None
    """Longest sample in tokens; longer ones are dropped (or truncated with ``truncate``)."""
    truncate: bool = False
    """Keep the first ``max_length`` tokens of long samples instead of dropping them."""
    format: str = "auto"
    """Record format: ``auto``, ``messages``, ``sharegpt`` or ``alpaca``."""
    fields: FieldMap = field(default_factory=FieldMap)
    """Custom record field names."""

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(
                f"--prompt-style {self.prompt_style!r} is unknown; choose one of {PROMPT_STYLES}."
            )
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"--loss-on {self.loss_on!r} is unknown; choose one of {LOSS_ON}.")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(
                f"--seq-length must be at least 2 tokens (one input, one label), got {self.max_length}."
            )
        if self.truncate and self.max_length is None:
            raise ValueError("--truncate needs a maximum length; pass --seq-length as well.")


@dataclass
class Sample:
    """One tokenised sample: ``ids`` (int32) and ``mask`` (uint8, 1 = learn this token)."""

    ids: np.ndarray
    mask: np.ndarray
    truncated: bool = False


def build_ids_and_mask(
    ids: np.ndarray,
    offsets: np.ndarray,
    spans: Sequence[tuple[int, int]],
    eot_ok: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Assemble ``(ids, mask)`` run by run with one ``add(tokens, mask_value)`` helper.

    ``offsets`` is ``(n, 2)`` character ``[start, end)`` per token; ``spans`` are the character
    ranges to learn, in order. ``eot_ok[j]`` says token ``j`` may serve as an end-of-turn marker.

    >>> ids = np.array([7, 8, 9, 2]); offs = np.array([[0, 3], [3, 5], [5, 9], [9, 19]])
    >>> build_ids_and_mask(ids, offs, [(3, 9)], eot_ok=np.array([0, 0, 0, 1], bool))[1]
    array([0, 1, 1, 1], dtype=uint8)
    """
    out_ids: list[np.ndarray] = []
    out_mask: list[np.ndarray] = []

    def add(tokens: np.ndarray, mask_value: int) -> None:
        out_ids.append(tokens)
        out_mask.append(np.full(len(tokens), mask_value, dtype=np.uint8))

    starts, ends = offsets[:, 0], offsets[:, 1]
    n, cursor = len(ids), 0
    for start, end in spans:
        first = max(int(ends.searchsorted(start, side="right")), cursor)
        stop = max(int(starts.searchsorted(end, side="left")), first)
        if eot_ok is not None and stop < n and eot_ok[stop] and starts[stop] == end:
            stop += 1
        add(ids[cursor:first], 0)
        add(ids[first:stop], 1)
        cursor = stop
    add(ids[cursor:], 0)
    return np.concatenate(out_ids).astype(np.int32), np.concatenate(out_mask)


class ConversationRenderer:
    """Records -> ``Sample`` or ``RecordError``, batch at a time (one per worker process)."""

    def __init__(self, tokenizer: Any, config: RenderConfig):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer; the loss "
                "mask needs offset mappings. Provide a folder with a tokenizer.json."
            )
        if config.prompt_style == "chat-template" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat_template; pass --prompt-style chatml or alpaca, or add "
                "a chat_template to its tokenizer_config.json."
            )
        if config.prompt_style == "alpaca" and not tokenizer.eos_token:
            raise ValueError("--prompt-style alpaca appends the EOS token, but the tokenizer has none.")
        self.tokenizer = tokenizer
        self.backend = backend
        self.config = config
        special = {i: t for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.anchors = tuple(sorted({t.content for t in special.values()}, key=len, reverse=True))
        vocab = max(len(tokenizer), backend.get_vocab_size(with_added_tokens=True))
        self.is_special = np.zeros(max(vocab, max(special, default=0) + 1), dtype=bool)
        self.is_special[list(special)] = True
        self.bos_id = tokenizer.bos_token_id
        self.template = ChatTemplate(tokenizer) if config.prompt_style == "chat-template" else None

    # -- text ---------------------------------------------------------------------------------
    def render_text(self, record: Any) -> RenderedText:
        conversation = to_conversation(record, self.config.format, self.config.fields)
        style = self.config.prompt_style
        if style == "alpaca":
            return render_alpaca(conversation, self.tokenizer.eos_token)
        if style == "chatml":
            return render_chatml(conversation)
        try:
            return render_chat_template(conversation, self.template, self.anchors)
        except Exception as exc:  # a Jinja template may raise on roles it does not support
            raise RecordError("template_error", f"the chat template failed: {exc}") from None

    def _learn_spans(self, rendered: RenderedText) -> list[tuple[int, int]]:
        if self.config.loss_on == "all":
            return [(0, len(rendered.text))]
        spans = rendered.assistant_spans
        if self.config.loss_on == "last-assistant":
            spans = spans[-1:]
        if any(s is None for s in spans):
            raise RecordError(
                "template_mismatch",
                "an assistant message was not found in the chat-template output (the template "
                "dropped or rewrote it); use --loss-on last-assistant or --prompt-style chatml",
            )
        return spans  # type: ignore[return-value]

    def _eot_ok(self, ids: np.ndarray, offsets: np.ndarray, rendered: RenderedText) -> np.ndarray:
        ok = self.is_special[ids]
        if self.bos_id is not None:
            ok &= ids != self.bos_id
        ends = offsets[:, 1]
        for span in rendered.message_spans:
            if span is None:
                continue
            j = int(ends.searchsorted(span[0], side="right")) - 1
            if j >= 0 and ends[j] == span[0] and ok[j]:
                ok &= ids != ids[j]  # a header token such as <｜User｜>, never an end-of-turn
        return ok

    # -- samples ------------------------------------------------------------------------------
    def render_batch(self, records: Sequence[Any]) -> list[Sample | RecordError]:
        results: list[Sample | RecordError | None] = [None] * len(records)
        texts, rendered_ok = [], []
        for i, record in enumerate(records):
            try:
                rendered = self.render_text(record)
                spans = self._learn_spans(rendered)
            except RecordError as err:
                results[i] = err
                continue
            texts.append(rendered.text)
            rendered_ok.append((i, rendered, spans))
        encodings = self.backend.encode_batch(texts, add_special_tokens=False) if texts else []
        for (i, rendered, spans), enc in zip(rendered_ok, encodings):
            results[i] = self._to_sample(enc, rendered, spans)
        return results  # type: ignore[return-value]

    def _to_sample(self, enc, rendered: RenderedText, spans) -> Sample | RecordError:
        ids = np.asarray(enc.ids, dtype=np.int64)
        pairs = enc.offsets  # list of (start, end) tuples; fromiter avoids a slow nested asarray
        offsets = np.fromiter(chain.from_iterable(pairs), dtype=np.int64, count=2 * len(pairs)).reshape(-1, 2)
        eot_ok = None if rendered.eot_in_spans else self._eot_ok(ids, offsets, rendered)
        ids32, mask = build_ids_and_mask(ids, offsets, spans, eot_ok)
        truncated = False
        limit = self.config.max_length
        if limit is not None and len(ids32) > limit:
            if not self.config.truncate:
                return RecordError(
                    "too_long", f"{len(ids32)} tokens exceed --seq-length {limit} (use --truncate to keep a prefix)"
                )
            ids32, mask, truncated = ids32[:limit], mask[:limit], True
        if not mask.any():
            return RecordError(
                "no_loss_tokens",
                "no token would be learned (truncated before the first assistant token?)",
            )
        return Sample(ids32, mask, truncated)
