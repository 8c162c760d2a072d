"""Render a ``Conversation`` to text plus the character spans the model should learn.

Two kinds of renderer return the same ``RenderedText``:

- named prompt styles (``alpaca``, ``chatml``) written here: we build the text ourselves, so every
  assistant span is known exactly and already includes its end-of-turn marker;
- ``chat-template`` (the default, in ``chat_template.py``): the tokenizer's own Jinja template, whose
  spans are located afterwards and whose end-of-turn token is found at the token level.

Example (chatml)::

    >>> r = render_chatml([Message("user", "Hi"), Message("assistant", "Hello")])
    >>> r.text
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n'
    >>> [r.text[s:e] for s, e in r.assistant_spans]
    ['Hello<|im_end|>']
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron.sft.data.formats import Conversation

PROMPT_STYLES = ("chat-template", "alpaca", "chatml")

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)


@dataclass
class RenderedText:
    """Rendered text and, per assistant turn in order, the ``(start, end)`` characters to learn.

    ``message_spans`` holds the located span of every message (``None`` when a template dropped
    or rewrote it beyond recognition); ``eot_in_spans`` says whether the end-of-turn marker is
    already inside ``assistant_spans`` (named styles) or must be found after them (templates).
    ``notices`` names things worth telling the user that do not drop the record (e.g. a
    ``reasoning_content`` the template did not render), once per occurrence.
    """

    text: str
    assistant_spans: list[tuple[int, int] | None]
    message_spans: list[tuple[int, int] | None] = field(default_factory=list)
    eot_in_spans: bool = True
    notices: list[str] = field(default_factory=list)


class _TextBuilder:
    """Append text pieces and remember where the trainable ones are."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.spans: list[tuple[int, int]] = []

    def add(self, text: str, trainable: bool = False) -> None:
        if trainable:
            self.spans.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def build(self) -> RenderedText:
        return RenderedText("".join(self.parts), list(self.spans))


def render_alpaca(conversation: Conversation, eos_token: str) -> RenderedText:
    """The classic Stanford-Alpaca layout; extra turns repeat Instruction/Response blocks.

    A system message replaces the default preamble. The response is followed by ``eos_token``
    (trainable, so the model learns to stop)::

        Below is an instruction ... request.\\n\\n### Instruction:\\nAdd 2 and 3\\n\\n### Response:\\n5</s>
    """
    system = next((m.content for m in conversation if m.role == "system"), None)
    first_user = next((m for m in conversation if m.role == "user"), None)
    has_input = first_user is not None and bool(first_user.context)
    out = _TextBuilder()
    out.add(system if system is not None else (ALPACA_PREAMBLE_WITH_INPUT if has_input else ALPACA_PREAMBLE))
    for m in conversation:
        if m.role == "user":
            out.add(f"\n\n### Instruction:\n{m.content}")
            if m.context:
                out.add(f"\n\n### Input:\n{m.context}")
        elif m.role == "assistant":
            out.add("\n\n### Response:\n")
            out.add(m.content + eos_token, trainable=True)
    return out.build()


def render_chatml(conversation: Conversation) -> RenderedText:
    """ChatML written directly (for tokenizers without a chat template)."""
    out = _TextBuilder()
    for m in conversation:
        out.add(f"<|im_start|>{m.role}\n")
        out.add(m.full_text() + "<|im_end|>", trainable=m.role == "assistant")
        out.add("\n")
    return out.build()
