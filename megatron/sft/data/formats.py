"""Turn one SFT record (messages / sharegpt / alpaca / custom fields) into a ``Conversation``.

Why one internal form: rendering, masking and tokenisation should not care which of the many
community layouts a file uses. Every format is converted here, validated once, and everything
downstream sees ``Conversation = list[Message]`` with roles ``system | user | assistant``.

Example::

    >>> to_conversation({"instruction": "Add 2 and 3", "input": "", "output": "5"})
    [Message(role='user', content='Add 2 and 3', context=None),
     Message(role='assistant', content='5', context=None)]

Bad records raise ``RecordError`` with a short machine-readable ``reason`` (used as a counter key
in the stats JSON) and a message that says what was wrong and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FORMATS = ("auto", "messages", "sharegpt", "alpaca")

#: role spellings accepted in the input -> our role. ShareGPT uses human/gpt; some dumps use
#: user/assistant or bot/model.
ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}

ALPACA_PROMPT_KEYS = ("instruction", "prompt", "question")
ALPACA_RESPONSE_KEYS = ("output", "response", "answer")


class RecordError(ValueError):
    """A record that cannot become a training sample. ``reason`` is a stable counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Message:
    """One turn. ``context`` is the optional alpaca ``input`` that accompanies an instruction."""

    role: str
    content: str
    context: str | None = None

    def full_text(self) -> str:
        """Content as a chat template should see it: the alpaca input joined after a blank line."""
        return f"{self.content}\n\n{self.context}" if self.context else self.content


Conversation = list[Message]


@dataclass(frozen=True)
class FieldMap:
    """Record field names. Defaults match the public formats; override for custom data.

    Example: ``FieldMap(prompt="q", response="a")`` reads ``{"q": "2+3?", "a": "5"}`` as alpaca.
    """

    messages: str | None = None
    """Key of the list of turns (``messages`` / ``conversations`` if None)."""
    role: str | None = None
    """Key of the role inside a turn (``role`` / ``from`` if None)."""
    content: str | None = None
    """Key of the text inside a turn (``content`` / ``value`` if None)."""
    prompt: str | None = None
    """Alpaca instruction key (``instruction`` / ``prompt`` / ``question`` if None)."""
    input: str | None = None
    """Alpaca input key (``input`` if None)."""
    response: str | None = None
    """Alpaca response key (``output`` / ``response`` / ``answer`` if None)."""
    system: str | None = None
    """System prompt key for alpaca-like records (``system`` if None)."""

    def implied_format(self) -> str | None:
        """A custom conversation key implies ``messages``; a custom prompt/response ``alpaca``."""
        if self.messages or self.role or self.content:
            return "messages"
        if self.prompt or self.response or self.input:
            return "alpaca"
        return None


def detect_format(record: dict[str, Any], fields: FieldMap = FieldMap()) -> str:
    """Pick the format from the keys present: messages > sharegpt > alpaca."""
    if fields.messages and fields.messages in record:
        return "messages"
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    prompt_keys = (fields.prompt,) if fields.prompt else ALPACA_PROMPT_KEYS
    if any(k in record for k in prompt_keys):
        return "alpaca"
    raise RecordError(
        "unknown_format",
        f"cannot detect the record format from keys {sorted(record)[:8]}: expected 'messages', "
        f"'conversations', or 'instruction'/'prompt'/'question' (pass --format or custom field "
        f"names such as --prompt-field)",
    )


def to_conversation(
    record: Any, fmt: str = "auto", fields: FieldMap = FieldMap()
) -> Conversation:
    """Convert and validate one record. Raises ``RecordError`` for anything unusable."""
    if not isinstance(record, dict):
        raise RecordError("wrong_type", f"a record must be a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = fields.implied_format() or detect_format(record, fields)
    if fmt in ("messages", "sharegpt"):
        conversation = _from_turns(record, fmt, fields)
    elif fmt == "alpaca":
        conversation = _from_alpaca(record, fields)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    _validate(conversation)
    return conversation


def _from_turns(record: dict, fmt: str, fields: FieldMap) -> Conversation:
    default_list_key = "messages" if fmt == "messages" else "conversations"
    candidates = (fields.messages,) if fields.messages else (default_list_key, "messages", "conversations")
    key = next((k for k in candidates if k in record), None)
    if key is None:
        raise RecordError("missing_field", f"missing the turn list field {candidates[0]!r}")
    turns = record[key]
    if not isinstance(turns, list):
        raise RecordError(
            "wrong_type", f"field {key!r} must be a list of turns, got {type(turns).__name__}"
        )
    conversation: Conversation = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError("wrong_type", f"{key}[{i}] must be an object, got {type(turn).__name__}")
        role_key = fields.role or ("role" if "role" in turn else "from")
        content_key = fields.content or ("content" if "content" in turn else "value")
        if role_key not in turn or content_key not in turn:
            raise RecordError(
                "missing_field", f"{key}[{i}] needs {role_key!r} and {content_key!r}, has {sorted(turn)}"
            )
        raw_role, content = turn[role_key], turn[content_key]
        role = ROLE_ALIASES.get(raw_role.lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise RecordError(
                "unknown_role",
                f"{key}[{i}].{role_key} = {raw_role!r} is not a known role "
                f"(expected one of {sorted(ROLE_ALIASES)})",
            )
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RecordError(
                "wrong_type",
                f"{key}[{i}].{content_key} must be a string, got {type(content).__name__}",
            )
        conversation.append(Message(role, content))
    return conversation


def _pick(record: dict, custom: str | None, defaults: tuple[str, ...]) -> tuple[str | None, Any]:
    keys = (custom,) if custom else defaults
    for k in keys:
        if k in record:
            return k, record[k]
    return None, None


def _from_alpaca(record: dict, fields: FieldMap) -> Conversation:
    p_key, prompt = _pick(record, fields.prompt, ALPACA_PROMPT_KEYS)
    r_key, response = _pick(record, fields.response, ALPACA_RESPONSE_KEYS)
    i_key, context = _pick(record, fields.input, ("input",))
    s_key, system = _pick(record, fields.system, ("system",))
    if p_key is None:
        raise RecordError("missing_field", f"missing the instruction field {fields.prompt or 'instruction'!r}")
    if r_key is None:
        raise RecordError("missing_field", f"missing the response field {fields.response or 'output'!r}")
    for key, value in ((p_key, prompt), (r_key, response), (i_key, context), (s_key, system)):
        if key is not None and value is not None and not isinstance(value, str):
            raise RecordError("wrong_type", f"field {key!r} must be a string, got {type(value).__name__}")
    conversation: Conversation = []
    if system:
        conversation.append(Message("system", system))
    conversation.append(Message("user", prompt or "", context or None))
    conversation.append(Message("assistant", response or ""))
    return conversation


def _validate(conversation: Conversation) -> None:
    for i, m in enumerate(conversation):
        try:
            m.content.encode("utf-8")
        except UnicodeEncodeError as exc:
            # JSON may escape a lone UTF-16 surrogate ("\ud800"); no tokenizer can encode it.
            raise RecordError(
                "non_utf8", f"turn {i} ({m.role}) holds an unpaired surrogate "
                f"U+{ord(m.content[exc.start]):04X} at character {exc.start}") from None
    assistants = [m for m in conversation if m.role == "assistant"]
    if not assistants:
        raise RecordError("no_assistant", "the conversation has no assistant turn to learn from")
    for m in assistants:
        if not m.content.strip():
            raise RecordError("empty_assistant", "an assistant turn has empty content")
