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

Which assistant turns are learned: ``--loss-on`` decides, then a turn's own ``"loss": true/false``
(or ``"weight": 1/0``) in the record overrides it for that turn. With ``--loss-on all`` a turn
marked ``false`` is left out together with its end-of-turn token, and so is every tool result's
text: tool results are never learned.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from megatron.sft.data.chat_template import (
    REASONING_NOT_RENDERED,
    AnchorSet,
    ChatTemplate,
    render_chat_template,
)
from megatron.sft.data.formats import (
    ROLES_OUT_OF_ORDER,
    Conversation,
    FieldMap,
    RecordError,
    role_order_problem,
    to_conversation,
)
from megatron.sft.data.loss_mask import (  # noqa: F401  (build_ids_and_mask: public here too)
    EncodingOffsets,
    TokenOffsets,
    build_ids_and_mask,
    learn_ranges,
    mask_from_ranges,
    subtract_ranges,
)
from megatron.sft.data.prompt_styles import PROMPT_STYLES, RenderedText, render_alpaca, render_chatml

LOSS_ON = ("assistant", "last-assistant", "all")

#: What each notice means, for the log line preprocess prints once per kind.
NOTICES = {
    REASONING_NOT_RENDERED: (
        "assistant turns carry reasoning_content that the rendering did not include (the chat "
        "template ignores it, or keeps it only for some turns as Qwen3's does after the last user "
        "turn); that reasoning is not trained on"
    ),
    ROLES_OUT_OF_ORDER: (
        "records whose turns are out of the usual order (e.g. an assistant turn first, or two "
        "user turns in a row; usual: system first, then user and assistant alternating, tool "
        "results after an assistant turn) are kept and trained on as written; check the data if "
        "that is not meant"
    ),
}


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


@dataclass
class TokenizedChunk:
    """The samples of one chunk of records, concatenated: a few arrays, cheap to pickle and write.

    ``errors`` lists ``(index in the chunk, reason, message)`` of dropped records, in order; the
    kept samples are the other records, in order. With lengths ``[3, 2]``, sample 0 is
    ``ids[0:3]`` and sample 1 ``ids[3:5]`` (same for ``mask``).
    """

    errors: list[tuple[int, str, str]]
    ids: np.ndarray
    """int32, all kept samples back to back."""
    mask: np.ndarray
    """uint8, aligned with ``ids``."""
    lengths: np.ndarray
    """int64 tokens per kept sample."""
    loss_tokens: np.ndarray
    """int64 learned tokens per kept sample."""
    truncated: int
    """How many kept samples were cut to ``max_length``."""
    notices: dict[str, int] = field(default_factory=dict)
    """Counts of ``NOTICES`` kinds seen in this chunk (records kept or not)."""


class Tokenized(NamedTuple):
    """One record after tokenisation, before it joins a chunk."""

    ids: list[int]
    """Token ids of the whole rendered text (``length`` of them are kept)."""
    length: int
    """Tokens kept: ``len(ids)``, or ``max_length`` when truncated."""
    ranges: list[tuple[int, int]]
    """Learned token ranges ``[first, stop)`` within the kept tokens."""
    truncated: bool


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
        self.anchors = AnchorSet(sorted({t.content for t in special.values()}, key=len, reverse=True))
        self.special_ids = frozenset(special)
        self.bos_id = tokenizer.bos_token_id
        self.template = ChatTemplate(tokenizer) if config.prompt_style == "chat-template" else None
        self.char_limit = self._char_limit(backend, config)

    @staticmethod
    def _char_limit(backend: Any, config: RenderConfig) -> int | None:
        """Characters beyond which a text surely has more than ``max_length`` tokens.

        No token covers more characters than its vocabulary string has (byte-level strings count
        bytes); the factor 4 leaves room for normalizers that shorten text. A 50 MB record is
        then dropped as ``too_long`` without building its millions of token offsets. Example:
        ``max_length`` 16384, longest token 128 characters -> 8,388,608 characters.
        """
        if config.max_length is None or config.truncate:
            return None
        longest = max((len(t) for t in backend.get_vocab(with_added_tokens=True)), default=1)
        return 4 * config.max_length * max(longest, 1)

    # -- text ---------------------------------------------------------------------------------
    def render_text(self, record: Any) -> RenderedText:
        return self._render(record)[1]

    def _render(self, record: Any) -> tuple[Conversation, RenderedText]:
        conversation = to_conversation(record, self.config.format, self.config.fields)
        rendered = self._render_conversation(conversation)
        if role_order_problem(conversation) is not None:  # once per record
            rendered.notices.append(ROLES_OUT_OF_ORDER)
        return conversation, rendered

    def _render_conversation(self, conversation: Conversation) -> RenderedText:
        style = self.config.prompt_style
        if style == "chat-template":
            return render_chat_template(conversation, self.template, self.anchors)
        if conversation.uses_tools():
            raise RecordError(
                "template_no_tools",
                f"--prompt-style {style} cannot render tools, tool calls or tool results; use "
                "--prompt-style chat-template with a tokenizer whose template supports tools",
            )
        if style == "alpaca":
            rendered = render_alpaca(conversation, self.tokenizer.eos_token)
        else:
            rendered = render_chatml(conversation)
        rendered.notices += [REASONING_NOT_RENDERED for m in conversation if (m.reasoning or "").strip()]
        return rendered

    def _learned_turns(self, rendered: RenderedText, conversation: Conversation | None) -> list[bool]:
        """Per assistant turn: learn it? ``--loss-on`` first, then the record's per-turn flag."""
        n = len(rendered.assistant_spans)
        learn = [i == n - 1 for i in range(n)] if self.config.loss_on == "last-assistant" else [True] * n
        if conversation is None:
            return learn
        flags = [m.loss for m in conversation if m.role == "assistant"]
        return [default if flag is None else flag for default, flag in zip(learn, flags)]

    @staticmethod
    def _located(spans: list) -> list[tuple[int, int]]:
        if any(s is None for s in spans):
            raise RecordError(
                "template_mismatch",
                "an assistant message was not found in the chat-template output (the template "
                "dropped or rewrote it); use --loss-on last-assistant or --prompt-style chatml",
            )
        return spans

    def _learn_spans(self, rendered: RenderedText,
                     conversation: Conversation | None = None) -> list[tuple[int, int]]:
        """Character spans to learn (for ``all``: the whole text, see ``_unlearned_spans``)."""
        if self.config.loss_on == "all":
            return [(0, len(rendered.text))]
        learn = self._learned_turns(rendered, conversation)
        return self._located([s for s, keep in zip(rendered.assistant_spans, learn) if keep])

    def _unlearned_spans(self, rendered: RenderedText,
                         conversation: Conversation | None) -> list[tuple[int, int]]:
        """With ``--loss-on all``: the assistant turns the record marks ``loss: false`` and the
        tool results (never learned), in text order."""
        if self.config.loss_on != "all" or conversation is None:
            return []
        learn = self._learned_turns(rendered, conversation)
        holes = self._located([s for s, keep in zip(rendered.assistant_spans, learn) if not keep])
        holes += [s for s, m in zip(rendered.message_spans, conversation) if m.role == "tool" and s]
        return sorted(holes)

    def _eot_rule(self, ids: list[int], offsets: TokenOffsets, rendered: RenderedText) -> Callable[[int], bool]:
        """Token ``j`` may end a turn: a special token, not BOS, and not a role header.

        A role header is a special token that ends exactly where some message's content starts
        (``<｜User｜>`` in DeepSeek templates); every occurrence of that token id is excluded.
        """
        special, bos = self.special_ids, self.bos_id
        headers = set()
        for span in rendered.message_spans:
            if span is None:
                continue
            j = offsets.ends_right(span[0]) - 1
            if j >= 0 and offsets.end(j) == span[0] and ids[j] in special and ids[j] != bos:
                headers.add(ids[j])
        return lambda j: ids[j] in special and ids[j] != bos and ids[j] not in headers

    # -- samples ------------------------------------------------------------------------------
    def render_batch(self, records: Sequence[Any]) -> list[Sample | RecordError]:
        """One ``Sample`` (or the ``RecordError`` that drops it) per record."""
        out: list[Sample | RecordError] = []
        for result in self._tokenize(records)[0]:
            if isinstance(result, RecordError):
                out.append(result)
                continue
            out.append(Sample(np.asarray(result.ids[:result.length], dtype=np.int32),
                              mask_from_ranges(result.length, result.ranges), result.truncated))
        return out

    def tokenize_chunk(self, records: Sequence[Any]) -> TokenizedChunk:
        """``render_batch`` with the kept samples concatenated: what a worker sends back."""
        errors, kept = [], []
        results, notices = self._tokenize(records)
        for i, result in enumerate(results):
            if isinstance(result, RecordError):
                errors.append((i, result.reason, str(result)))
            else:
                kept.append(result)
        lengths = np.fromiter((t.length for t in kept), dtype=np.int64, count=len(kept))
        total = int(lengths.sum())
        ids = np.fromiter(chain.from_iterable(t.ids if len(t.ids) == t.length else t.ids[:t.length]
                                              for t in kept), dtype=np.int32, count=total)
        mask = np.zeros(total, dtype=np.uint8)
        loss_tokens = np.fromiter((sum(stop - first for first, stop in t.ranges) for t in kept),
                                  dtype=np.int64, count=len(kept))
        offset = 0
        for t in kept:
            mask_from_ranges(t.length, t.ranges, out=mask[offset:offset + t.length])
            offset += t.length
        truncated = sum(t.truncated for t in kept)
        return TokenizedChunk(errors, ids, mask, lengths, loss_tokens, truncated, dict(notices))

    def _tokenize(self, records: Sequence[Any]) -> tuple[list[Tokenized | RecordError], Counter]:
        """Per record a ``Tokenized`` or the error that drops it, and the batch's notice counts.

        All texts of the batch go through one ``encode_batch`` call.
        """
        results: list[Tokenized | RecordError | None] = [None] * len(records)
        notices: Counter = Counter()
        texts, rendered_ok = [], []
        for i, record in enumerate(records):
            try:
                conversation, rendered = self._render(record)
                notices.update(rendered.notices)
                spans = self._learn_spans(rendered, conversation)
                holes = self._unlearned_spans(rendered, conversation)
            except RecordError as err:
                results[i] = err
                continue
            if self.char_limit is not None and len(rendered.text) > self.char_limit:
                results[i] = RecordError(
                    "too_long", f"{len(rendered.text):,} characters cannot fit in --seq-length "
                    f"{self.config.max_length} tokens (use --truncate to keep a prefix)")
                continue
            texts.append(rendered.text)
            rendered_ok.append((i, rendered, spans, holes))
        encodings = self.backend.encode_batch(texts, add_special_tokens=False) if texts else []
        for (i, rendered, spans, holes), enc in zip(rendered_ok, encodings):
            results[i] = self._learned(enc, rendered, spans, holes)
        return results, notices  # type: ignore[return-value]

    def _learned(self, enc: Any, rendered: RenderedText, spans, holes=()) -> Tokenized | RecordError:
        ids = enc.ids
        n = len(ids)
        offsets = EncodingOffsets(enc, n)
        eot_ok = None if rendered.eot_in_spans else self._eot_rule(ids, offsets, rendered)
        ranges = learn_ranges(offsets, spans, eot_ok)
        if holes:  # --loss-on all minus the turns marked loss: false, end-of-turn tokens included
            ranges = subtract_ranges(ranges, learn_ranges(offsets, holes, eot_ok))
        truncated = False
        limit = self.config.max_length
        if limit is not None and n > limit:
            if not self.config.truncate:
                return RecordError(
                    "too_long", f"{n} tokens exceed --seq-length {limit} (use --truncate to keep a prefix)"
                )
            n, truncated = limit, True
            ranges = [(first, min(stop, limit)) for first, stop in ranges if first < limit]
        if not any(stop > first for first, stop in ranges):
            return RecordError(
                "no_loss_tokens",
                "no token would be learned (truncated before the first assistant token?)",
            )
        return Tokenized(ids, n, ranges, truncated)
