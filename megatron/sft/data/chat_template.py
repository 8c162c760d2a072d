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
"""

from __future__ import annotations

from typing import Sequence

from megatron.sft.data.formats import Conversation
from megatron.sft.data.prompt_styles import RenderedText

_MAX_OCCURRENCES = 8


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


def _find_one(text: str, needle: str, start: int, anchors: tuple[str, ...]) -> int:
    first = -1
    pos = text.find(needle, start)
    for _ in range(_MAX_OCCURRENCES):
        if pos < 0:
            break
        if first < 0:
            first = pos
        end = pos + len(needle)
        if end == len(text) or text.startswith(anchors, end):  # a tuple: any of them
            return pos
        pos = text.find(needle, pos + 1)
    return first


def locate_messages(
    text: str, contents: Sequence[str], anchors: Sequence[str] = ()
) -> list[tuple[int, int] | None]:
    """Character span of each content in ``text``, searched left to right; ``None`` if absent."""
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    anchors = tuple(anchors)
    for content in contents:
        found = None
        for form in content_candidates(content):
            pos = _find_one(text, form, cursor, anchors)
            if pos >= 0:
                found = (pos, pos + len(form))
                break
        spans.append(found)
        if found is not None:
            cursor = found[1]
    return spans


class ChatTemplate:
    """The tokenizer's chat template, compiled once and rendered exactly as HF renders it.

    ``apply_chat_template`` re-validates its arguments on every call, which costs more than the
    Jinja rendering itself; we call the same compiled template with the same variables (the
    tokenizer's special tokens) directly, and fall back to ``apply_chat_template`` if this
    ``transformers`` version does not expose the compiler.

    ``Template.render(**vars)`` would also flatten the template's globals (a ``ChainMap``) into a
    new dict on every call; we flatten them once and hand each call a ready context
    (``new_context(..., shared=True)``), then finish exactly as ``render`` does.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.variables = dict(tokenizer.special_tokens_map)
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            source = tokenizer.get_chat_template() if hasattr(tokenizer, "get_chat_template") else tokenizer.chat_template
            self.compiled = _compile_jinja_template(source)
        except Exception:  # private API moved: stay correct, just slower
            self.compiled = None
        if self.compiled is not None:
            # = what render(messages=..., **fixed) puts in its context, minus the messages
            self._fixed = dict(self.compiled.globals, tools=None, documents=None,
                               add_generation_prompt=False, **self.variables)

    def __call__(self, messages: list[dict]) -> str:
        if self.compiled is None:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        template = self.compiled
        context = template.new_context(dict(self._fixed, messages=messages), shared=True)
        try:
            return template.environment.concat(template.root_render_func(context))
        except Exception:
            template.environment.handle_exception()  # re-raises, as Template.render does
            raise  # not reached


def render_chat_template(
    conversation: Conversation, template: ChatTemplate, anchors: Sequence[str] = ()
) -> RenderedText:
    """Render with ``template`` and locate every message in the result."""
    messages = [{"role": m.role, "content": m.full_text()} for m in conversation]
    text = template(messages)
    spans = locate_messages(text, [m["content"] for m in messages], anchors)
    assistant = [s for s, m in zip(spans, conversation) if m.role == "assistant"]
    return RenderedText(text, assistant, message_spans=spans, eot_in_spans=False)
