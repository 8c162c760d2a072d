"""Render with the tokenizer's own chat template and find where each message landed in the text.

Why not "render prefixes and diff them": templates such as DeepSeek-R1's rewrite *earlier* turns
(they drop the ``<think>…</think>`` part of past assistant answers), so the prefix rendered for
turn k is not a prefix of the full conversation. Instead we render the whole conversation once
and search each message's content, in order, in the rendered text. A template may also trim the
content or cut the thinking, so a few rewritten forms are tried.

Example (ChatML)::

    text  = '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n'
    spans = locate_messages(text, ['Hi', 'Hello'], anchors=('<|im_end|>',))
          = [(17, 19), (52, 57)]          # text[52:57] == 'Hello'

When a string occurs several times after the cursor (content ``"assistant"`` right after the
``assistant`` role header), the occurrence followed by a special token (``anchors``) or by the end
of the text wins: templates close a turn with a marker, headers are followed by content.

Assistant turns whose rendered text is not their content (``tool_calls`` the template writes as
``<tool_call>{...}</tool_call>`` or JSON, ``reasoning_content`` it writes as ``<think>…</think>``)
are found by rendering the conversation a second time with only that turn replaced by a marker
character: the two texts differ exactly in that turn's body (``locate_turn_body``).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Sequence

from megatron.sft.data.formats import Conversation, Message, RecordError
from megatron.sft.data.prompt_styles import RenderedText
from megatron.sft.data.template_compile import alias_reasoning_fields, compile_chat_template

_MAX_OCCURRENCES = 8
#: Private-use characters: one that the rendered text does not contain replaces a turn's body.
_MARKERS = ("\ue000", "\ue001", "\ue002", "\U000f0000", "\U000f0001")

#: Notices (not drops) a render may add; preprocess logs each kind once and counts them.
REASONING_NOT_RENDERED = "reasoning_not_rendered"


def content_candidates(content: str) -> list[str]:
    """Forms a template may print for ``content``: as is, trimmed, or with the thinking cut off.

    >>> content_candidates(" <think>x</think>\\n\\nFive. ")
    [' <think>x</think>\\n\\nFive. ', '<think>x</think>\\n\\nFive.', '\\n\\nFive. ', 'Five.']
    """
    forms = [content, content.strip()]
    if "</think>" in content:
        answer = content.split("</think>")[-1]
        forms += [answer, answer.strip()]
    unique: list[str] = []
    for form in forms:
        if form and form not in unique:
            unique.append(form)
    return unique


class AnchorSet(tuple):
    """The anchors (special-token strings), also as one set per length.

    ``text.startswith(anchors, end)`` compares every one of them (1,283 for DeepSeek's tokenizer,
    nearly all starting with ``<｜``) at each probe; looking up ``text[end:end + n]`` in the set of
    anchors of length ``n`` takes one probe per distinct length instead. Same answers:
    ``AnchorSet(("<a>", "<bc>")).starts(text, i) == text.startswith(("<a>", "<bc>"), i)``.
    """

    def __new__(cls, anchors=()):
        self = super().__new__(cls, anchors)
        by_length: dict[int, set[str]] = {}
        for a in self:
            by_length.setdefault(len(a), set()).add(a)
        self.by_length = tuple((n, frozenset(group)) for n, group in sorted(by_length.items()))
        return self

    def starts(self, text: str, pos: int) -> bool:
        return any(text[pos:pos + n] in group for n, group in self.by_length) if pos <= len(text) else False


def _find_one(text: str, needle: str, start: int, anchors: tuple[str, ...]) -> int:
    first = -1
    pos = text.find(needle, start)
    starts = anchors.starts if isinstance(anchors, AnchorSet) else (lambda t, i: t.startswith(anchors, i))
    for _ in range(_MAX_OCCURRENCES):
        if pos < 0:
            break
        if first < 0:
            first = pos
        end = pos + len(needle)
        if end == len(text) or starts(text, end):  # any of them
            return pos
        pos = text.find(needle, pos + 1)
    return first


def locate_content(text: str, content: str, cursor: int, anchors: tuple[str, ...]) -> tuple[int, int] | None:
    """Span of the first form of ``content`` found in ``text`` at or after ``cursor``."""
    for form in content_candidates(content):
        pos = _find_one(text, form, cursor, anchors)
        if pos >= 0:
            return pos, pos + len(form)
    return None


def locate_messages(
    text: str, contents: Sequence[str], anchors: Sequence[str] = ()
) -> list[tuple[int, int] | None]:
    """Character span of each content in ``text``, searched left to right; ``None`` if absent."""
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    anchors = anchors if isinstance(anchors, AnchorSet) else AnchorSet(anchors)
    for content in contents:
        found = locate_content(text, content, cursor, anchors)
        spans.append(found)
        if found is not None:
            cursor = found[1]
    return spans


def template_message(message: Message) -> dict[str, Any]:
    """One turn as ``apply_chat_template`` receives it from an OpenAI-shape record.

    >>> template_message(Message("assistant", "", tool_calls=[{"function": {"name": "f", "arguments": {}}}]))
    {'role': 'assistant', 'content': '', 'tool_calls': [{'function': {'name': 'f', 'arguments': {}}}]}
    """
    out: dict[str, Any] = {"role": message.role, "content": message.full_text()}
    if message.tool_calls:
        out["tool_calls"] = message.tool_calls
    if message.reasoning is not None:
        out["reasoning_content"] = message.reasoning
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


class ChatTemplate:
    """The tokenizer's chat template, compiled once and rendered exactly as HF renders it.

    ``apply_chat_template`` re-validates its arguments on every call, which costs more than the
    Jinja rendering itself; we compile the template in the same environment
    (``template_compile.compile_chat_template``, no transformers import) and call it with the
    same variables (the tokenizer's special tokens).

    ``Template.render(**vars)`` would also flatten the template's globals (a ``ChainMap``) into a
    new dict on every call; we flatten them once and hand each call a ready context
    (``new_context(..., shared=True)``), then finish exactly as ``render`` does.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.variables = dict(tokenizer.special_tokens_map)
        source = tokenizer.get_chat_template() if hasattr(tokenizer, "get_chat_template") else tokenizer.chat_template
        self.compiled = compile_chat_template(source)
        # = what render(messages=..., **fixed) puts in its context, minus the messages
        self._fixed = dict(self.compiled.globals, tools=None, documents=None,
                           add_generation_prompt=False, **self.variables)

    def __call__(self, messages: list[dict], tools: list[dict] | None = None,
                 add_generation_prompt: bool = False) -> str:
        if any("reasoning_content" in m or "thinking" in m or "reasoning" in m for m in messages):
            messages = alias_reasoning_fields(messages)  # as apply_chat_template does
        template = self.compiled
        context = template.new_context(
            dict(self._fixed, messages=messages, tools=tools, add_generation_prompt=add_generation_prompt),
            shared=True)
        try:
            return template.environment.concat(template.root_render_func(context))
        except Exception:
            template.environment.handle_exception()  # re-raises, as Template.render does
            raise  # not reached

    @cached_property
    def assistant_header(self) -> str | None:
        """What ``add_generation_prompt`` appends (``'<|im_start|>assistant\\n'``); None if unknown."""
        probe = [{"role": "user", "content": _MARKERS[0]}]
        try:
            plain, prompted = self(probe), self(probe, add_generation_prompt=True)
        except Exception:
            return None
        return prompted[len(plain):] if prompted.startswith(plain) and len(prompted) > len(plain) else None


def _common_prefix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # bisection on slice equality: a few C-speed compares, no per-character loop
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def locate_turn_body(
    text: str, messages: list[dict], tools: list[dict] | None, k: int, template: ChatTemplate, cursor: int
) -> tuple[int, int] | None:
    """Characters of ``text`` that assistant turn ``k`` rendered as, or None if not isolable.

    Turn ``k`` is rendered again as a plain marker; the common prefix and suffix of the two texts
    bound the body. The start then moves back to the end of the assistant header when the
    template wrote something between them in both texts (Qwen3 opens every final turn with
    ``<think>\\n``), since the model must generate that too. Example (ChatML with tools)::

        text   ...<|im_start|>assistant\\n<tool_call>\\n{"name": "f", ...}\\n</tool_call><|im_end|>\\n...
        marker ...<|im_start|>assistant\\n\\ue000<|im_end|>\\n...
        body                              <tool_call>\\n{"name": "f", ...}\\n</tool_call>
    """
    marker = next((c for c in _MARKERS if c not in text), None)
    if marker is None:
        return None
    probe = list(messages)
    probe[k] = {"role": "assistant", "content": marker}
    try:
        other = template(probe, tools)
    except Exception:
        return None
    if other.count(marker) != 1:
        return None
    start = _common_prefix(text, other)
    suffix = _common_suffix(text, other, min(len(text), len(other)) - start)
    end = len(text) - suffix
    at = other.index(marker)
    if not (start <= at and at + len(marker) <= len(other) - suffix) or start < cursor:
        return None  # the texts differ outside this turn: the template reads the turn globally
    header = template.assistant_header
    h = text.rfind(header, cursor, start) if header else -1
    if h >= 0:
        start = h + len(header)
    return start, max(start, end)


def _tool_names(items: Sequence[Any]) -> list[str]:
    """``[{"type": "function", "function": {"name": "f"}}]`` or ``[{"name": "f"}]`` -> ``["f"]``."""
    names = []
    for item in items or ():
        spec = item.get("function", item) if isinstance(item, dict) else None
        name = spec.get("name") if isinstance(spec, dict) else None
        if isinstance(name, str) and name:
            names.append(name)
    return names


def _no_tools(what: str) -> RecordError:
    return RecordError("template_no_tools", f"the chat template {what}; use a tokenizer whose chat "
                                            "template supports tools (Qwen2.5+, Llama 3.1+, ...)")


def render_chat_template(
    conversation: Conversation, template: ChatTemplate, anchors: Sequence[str] = ()
) -> RenderedText:
    """Render with ``template`` and locate every message in the result.

    Raises ``RecordError`` when the template fails (``template_error``) or cannot render the
    conversation's tools, tool calls or tool results (``template_no_tools``).
    """
    messages = [template_message(m) for m in conversation]
    tools = getattr(conversation, "tools", None)
    try:
        text = template(messages, tools)
    except Exception as exc:  # a Jinja template may raise on roles it does not support
        if isinstance(conversation, Conversation) and conversation.uses_tools():
            raise _no_tools(f"failed on a conversation with tools ({exc})") from None
        raise RecordError("template_error", f"the chat template failed: {exc}") from None
    missing = [n for n in _tool_names(tools) if n not in text] if tools else None
    if missing:
        raise _no_tools(f"does not render the 'tools' list (tool {missing[0]!r} is not in its output)")
    anchors = anchors if isinstance(anchors, AnchorSet) else AnchorSet(anchors)
    spans: list[tuple[int, int] | None] = []
    notices: list[str] = []
    cursor = 0
    for k, m in enumerate(conversation):
        if m.role == "assistant" and (m.tool_calls or (m.reasoning or "").strip()):
            span = locate_turn_body(text, messages, tools, k, template, cursor)
            body = text[span[0]:span[1]] if span else ""
            if span and any(n not in body for n in _tool_names(m.tool_calls)):
                raise _no_tools(f"does not render the tool calls of turn {k}")
            if m.reasoning and m.reasoning.strip() not in body:
                notices.append(REASONING_NOT_RENDERED)
        else:
            span = locate_content(text, m.full_text(), cursor, anchors)
            if span is None and m.role == "tool" and m.content.strip():
                raise _no_tools(f"dropped the tool result of turn {k}")
        spans.append(span)
        if span is not None:
            cursor = span[1]
    assistant = [s for s, m in zip(spans, conversation) if m.role == "assistant"]
    return RenderedText(text, assistant, message_spans=spans, eot_in_spans=False, notices=notices)
