"""Turn one SFT record (messages / sharegpt / alpaca / custom fields) into a ``Conversation``.

Why one internal form: rendering, masking and tokenisation should not care which of the many
community layouts a file uses. Every format is converted here, validated once, and everything
downstream sees a ``Conversation`` (a list of ``Message``) with roles
``system | user | assistant | tool`` plus the record's tool definitions.

Example::

    >>> to_conversation({"instruction": "Add 2 and 3", "input": "", "output": "5"})
    [Message(role='user', content='Add 2 and 3', context=None, ...),
     Message(role='assistant', content='5', context=None, ...)]

Adding a record format = one converter function decorated with ``@record_format`` below: the
table ``RECORD_FORMATS`` drives detection (in registration order), conversion, the ``--format``
choices and their help text; nothing else needs to change.

Bad records raise ``RecordError`` with a short machine-readable ``reason`` (used as a counter key
in the stats JSON) and a message that says what was wrong and what was expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

#: role spellings accepted in the input -> our role. ShareGPT uses human/gpt; some dumps use
#: user/assistant or bot/model. Tool results come as ``tool`` (OpenAI), ``function`` (OpenAI's
#: older API), ``observation`` (LLaMA-Factory) or ``ipython`` (Llama 3.1); they become ``tool``,
#: the role Hugging Face chat templates read.
ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "ipython": "tool",
}
#: LLaMA-Factory's ShareGPT role for an assistant tool call (its value is the call as JSON).
FUNCTION_CALL_ROLE = "function_call"

ALPACA_PROMPT_KEYS = ("instruction", "prompt", "question")
ALPACA_RESPONSE_KEYS = ("output", "response", "answer")


class RecordError(ValueError):
    """A record that cannot become a training sample. ``reason`` is a stable counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # readers hand some errors to worker processes: pickle both fields
        return type(self), (self.reason, str(self))


@dataclass(frozen=True)
class Message:
    """One turn. ``context`` is the optional alpaca ``input`` that accompanies an instruction.

    The other optional fields carry what chat templates read besides the text: an assistant
    turn's ``tool_calls`` (as in the record, OpenAI shape) and ``reasoning`` (its
    ``reasoning_content``), a tool result's ``name`` / ``tool_call_id``, and ``loss``: the
    record's per-turn override of ``--loss-on`` (True: learn this turn, False: do not, None: the
    flag decides).
    """

    role: str
    content: str
    context: str | None = None
    tool_calls: list | None = None
    reasoning: str | None = None
    loss: bool | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def full_text(self) -> str:
        """Content as a chat template should see it: the alpaca input joined after a blank line."""
        return f"{self.content}\n\n{self.context}" if self.context else self.content


class Conversation(list):
    """The turns of one record (a plain ``list`` of ``Message``) and its ``tools`` definitions.

    A list so that code and tests that only care about turns treat it as one; ``tools`` (the
    record's top-level tool schemas, passed to ``apply_chat_template(tools=...)``) is ``None``
    when the record has none. List equality ignores ``tools``.
    """

    def __init__(self, messages=(), tools: list[dict] | None = None):
        super().__init__(messages)
        self.tools = tools

    def uses_tools(self) -> bool:
        return bool(self.tools) or any(m.tool_calls or m.role == "tool" for m in self)


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
    """Top-level system prompt key, for every format (``system`` if None)."""
    tools: str | None = None
    """Top-level tool definitions key of messages / ShareGPT records (``tools`` if None)."""

    def implied_format(self) -> str | None:
        """A custom conversation key implies ``messages``; a custom prompt/response ``alpaca``."""
        if self == _NO_CUSTOM_FIELDS:  # the usual case, checked per record: skip the table walk
            return None
        for fmt in RECORD_FORMATS.values():
            if any(getattr(self, name) for name in fmt.implied_by):
                return fmt.name
        return None


_NO_CUSTOM_FIELDS = FieldMap()


# -- the format table ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordFormat:
    """One record layout: how to recognise it and how to convert it."""

    name: str
    convert: Callable[[dict, FieldMap], Conversation]
    detect: Callable[[dict, FieldMap], bool]
    """True when a record's keys show this layout; formats are tried in registration order."""
    example: str
    """One-line example for ``--format`` help and error messages."""
    implied_by: tuple[str, ...] = ()
    """``FieldMap`` attributes whose custom value selects this format without detection."""


RECORD_FORMATS: dict[str, RecordFormat] = {}


def record_format(name: str, *, detect: Callable[[dict, FieldMap], bool], example: str,
                  implied_by: tuple[str, ...] = ()):
    """Register the decorated ``convert(record, fields) -> Conversation`` as format ``name``."""

    def register(convert: Callable[[dict, FieldMap], Conversation]):
        RECORD_FORMATS[name] = RecordFormat(name, convert, detect, example, implied_by)
        return convert

    return register


def detect_format(record: dict[str, Any], fields: FieldMap = FieldMap()) -> str:
    """Pick the format from the keys present, trying ``RECORD_FORMATS`` in order."""
    for fmt in RECORD_FORMATS.values():
        if fmt.detect(record, fields):
            return fmt.name
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
    if fmt not in RECORD_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    conversation = RECORD_FORMATS[fmt].convert(record, fields)
    _validate(conversation)
    return conversation


# -- turn lists: messages (OpenAI) and ShareGPT ---------------------------------------------------
@record_format(
    "messages", implied_by=("messages", "role", "content"),
    detect=lambda r, f: bool(f.messages and f.messages in r) or "messages" in r,
    example="{'messages': [{'role', 'content'}], 'system'?, 'tools'?}",
)
def _from_messages(record: dict, fields: FieldMap) -> Conversation:
    return _from_turns(record, "messages", fields)


@record_format(
    "sharegpt", detect=lambda r, f: "conversations" in r,
    example="{'conversations': [{'from', 'value'}], 'system'?, 'tools'?}",
)
def _from_sharegpt(record: dict, fields: FieldMap) -> Conversation:
    return _from_turns(record, "conversations", fields)


def _from_turns(record: dict, default_list_key: str, fields: FieldMap) -> Conversation:
    candidates = (fields.messages,) if fields.messages else (default_list_key, "messages", "conversations")
    key = next((k for k in candidates if k in record), None)
    if key is None:
        raise RecordError("missing_field", f"missing the turn list field {candidates[0]!r}")
    turns = record[key]
    if not isinstance(turns, list):
        raise RecordError(
            "wrong_type", f"field {key!r} must be a list of turns, got {type(turns).__name__}"
        )
    conversation = Conversation(tools=_tools(record, fields))
    system = _top_level_system(record, fields)
    if system:
        conversation.append(Message("system", system))
    for i, turn in enumerate(turns):
        message = _turn(turn, f"{key}[{i}]", fields)
        if system and message.role == "system":
            raise RecordError(
                "duplicate_system",
                f"the record has a top-level {fields.system or 'system'!r} field and a system turn "
                f"({key}[{i}]); keep one of them (the template would otherwise see two system prompts)",
            )
        conversation.append(message)
    return conversation


def _top_level_system(record: dict, fields: FieldMap) -> str | None:
    key, system = _pick(record, fields.system, ("system",))
    if system is not None and not isinstance(system, str):
        raise RecordError("wrong_type", f"field {key!r} must be a string, got {type(system).__name__}")
    return system


def _tools(record: dict, fields: FieldMap) -> list[dict] | None:
    """The record's tool schemas; LLaMA-Factory stores them as a JSON string."""
    key, tools = _pick(record, fields.tools, ("tools",))
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise RecordError("wrong_type", f"field {key!r} is a string but not JSON ({exc.msg})") from None
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("wrong_type", f"field {key!r} must be a list of tool objects (JSON schemas), "
                                        f"got {type(tools).__name__}")
    return tools


def _turn(turn: Any, where: str, fields: FieldMap) -> Message:
    if not isinstance(turn, dict):
        raise RecordError("wrong_type", f"{where} must be an object, got {type(turn).__name__}")
    role_key = fields.role or ("role" if "role" in turn else "from")
    content_key = fields.content or ("content" if "content" in turn else "value")
    if role_key not in turn:
        raise RecordError("missing_field", f"{where} needs {role_key!r} and {content_key!r}, has {sorted(turn)}")
    raw_role = turn[role_key]
    if raw_role == FUNCTION_CALL_ROLE:
        return Message("assistant", "", tool_calls=_function_call_value(turn.get(content_key), where),
                       loss=_loss_flag(turn, where))
    role = ROLE_ALIASES.get(raw_role.lower()) if isinstance(raw_role, str) else None
    if role is None:
        raise RecordError(
            "unknown_role",
            f"{where}.{role_key} = {raw_role!r} is not a known role "
            f"(expected one of {sorted(ROLE_ALIASES) + [FUNCTION_CALL_ROLE]})",
        )
    content = turn.get(content_key)
    if len(turn) == 2 and isinstance(content, str):  # the common {"role", "content"} turn
        return Message(role, content)
    tool_calls = turn.get("tool_calls") or None
    if content_key not in turn and not tool_calls:  # OpenAI may omit content next to tool_calls
        raise RecordError("missing_field", f"{where} needs {role_key!r} and {content_key!r}, has {sorted(turn)}")
    content = _text(content, f"{where}.{content_key}")
    if tool_calls is not None:
        if role != "assistant":
            raise RecordError("wrong_type", f"{where} has 'tool_calls' but role {raw_role!r}; only "
                                            "assistant turns call tools")
        if not isinstance(tool_calls, list) or not all(isinstance(c, dict) for c in tool_calls):
            raise RecordError("wrong_type", f"{where}.tool_calls must be a list of objects "
                                            "({'type': 'function', 'function': {'name', 'arguments'}})")
    reasoning = turn.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise RecordError("wrong_type", f"{where}.reasoning_content must be a string, "
                                        f"got {type(reasoning).__name__}")
    extra = {k: turn[k] for k in ("name", "tool_call_id") if isinstance(turn.get(k), str)}
    return Message(role, content, tool_calls=tool_calls, reasoning=reasoning,
                   loss=_loss_flag(turn, where) if role == "assistant" else None, **extra)


def _text(content: Any, where: str) -> str:
    """A turn's text: a string, None (empty), or OpenAI content parts whose text is concatenated.

    ``[{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]`` -> ``"Hi there"``.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordError("wrong_type", f"{where} must be a string or a list of content parts, "
                                        f"got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RecordError("wrong_type", f"{where}[{j}] must be a content part {{'type': 'text', 'text': ...}}")
        if part["type"] != "text":
            raise RecordError("unsupported_content", f"{where}[{j}] is a {part['type']!r} part; only "
                                                     "'text' parts are supported (text-only training)")
        if not isinstance(part.get("text"), str):
            raise RecordError("wrong_type", f"{where}[{j}].text must be a string")
        texts.append(part["text"])
    return "".join(texts)


def _loss_flag(turn: dict, where: str) -> bool | None:
    """``"loss": true/false`` or ``"weight": 1/0`` on an assistant turn; None when absent."""
    if turn.get("loss") is not None:
        if not isinstance(turn["loss"], bool):
            raise RecordError("wrong_type", f"{where}.loss must be true or false, got {turn['loss']!r}")
        return turn["loss"]
    if turn.get("weight") is not None:
        weight = turn["weight"]
        if isinstance(weight, bool) or weight not in (0, 1):
            raise RecordError("wrong_type", f"{where}.weight must be 0 or 1, got {weight!r} "
                                            "(fractional weights are not supported)")
        return bool(weight)
    return None


def _function_call_value(value: Any, where: str) -> list[dict]:
    """LLaMA-Factory's ``function_call`` turn value -> OpenAI ``tool_calls``.

    ``'{"name": "f", "arguments": {"x": 1}}'`` ->
    ``[{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]``
    """
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as exc:
        raise RecordError("wrong_type",
                          f"{where} is a function_call whose value is not JSON ({exc.msg})") from None
    calls = [calls] if isinstance(calls, dict) else calls
    if not calls or not isinstance(calls, list) or not all(isinstance(c, dict) and "name" in c for c in calls):
        raise RecordError("wrong_type", f"{where} is a function_call; its value must be "
                                        "{'name': ..., 'arguments': ...} or a list of those")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
            for c in calls]


# -- alpaca -------------------------------------------------------------------------------------
def _pick(record: dict, custom: str | None, defaults: tuple[str, ...]) -> tuple[str | None, Any]:
    keys = (custom,) if custom else defaults
    for k in keys:
        if k in record:
            return k, record[k]
    return None, None


@record_format(
    "alpaca", implied_by=("prompt", "response", "input"),
    detect=lambda r, f: any(k in r for k in ((f.prompt,) if f.prompt else ALPACA_PROMPT_KEYS)),
    example="instruction/input/output (or prompt/response, question/answer)",
)
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
    conversation = Conversation()
    if system:
        conversation.append(Message("system", system))
    conversation.append(Message("user", prompt or "", context or None))
    conversation.append(Message("assistant", response or ""))
    return conversation


#: ``--format`` choices: ``auto`` then every registered format.
FORMATS = ("auto", *RECORD_FORMATS)

# -- turn order ---------------------------------------------------------------------------------
#: Notice (a count in the stats, not a drop) for a record whose roles are out of order.
ROLES_OUT_OF_ORDER = "roles_out_of_order"
#: role -> the roles the turn before it may have (None: it is the first turn)
_MAY_FOLLOW = {
    "system": {None, "system"},
    "user": {None, "system", "assistant", "tool"},
    "assistant": {"user", "tool"},
    "tool": {"assistant", "tool"},
}


def role_order_problem(conversation: Conversation) -> str | None:
    """The first turn out of the usual order, in words, or None when the order is usual: system
    turns first, then user and assistant turns alternating, tool results after an assistant turn
    (or another tool result). Such records are kept (chat templates render most of them); the
    pre-tokenizer counts them under the ``roles_out_of_order`` notice.

    >>> role_order_problem([Message("assistant", "Hi"), Message("user", "?")])
    'turn 0 (assistant) is the first turn'
    >>> role_order_problem([Message("user", "a"), Message("user", "b"), Message("assistant", "c")])
    'turn 1 (user) follows a user turn'
    """
    previous = None
    for i, m in enumerate(conversation):
        if previous not in _MAY_FOLLOW[m.role]:
            return (f"turn {i} ({m.role}) is the first turn" if previous is None
                    else f"turn {i} ({m.role}) follows a{'n' if previous == 'assistant' else ''} "
                         f"{previous} turn")
        previous = m.role
    return None


def _validate(conversation: Conversation) -> None:
    for i, m in enumerate(conversation):
        for text in (m.content, m.reasoning) if m.reasoning else (m.content,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                # JSON may escape a lone UTF-16 surrogate ("\ud800"); no tokenizer can encode it.
                raise RecordError(
                    "non_utf8", f"turn {i} ({m.role}) holds an unpaired surrogate "
                    f"U+{ord(text[exc.start]):04X} at character {exc.start}") from None
    if conversation.uses_tools():
        try:
            json.dumps([conversation.tools, [m.tool_calls for m in conversation]], ensure_ascii=False).encode()
        except (UnicodeEncodeError, TypeError, ValueError) as exc:
            raise RecordError("non_utf8", f"the tools or tool calls cannot be encoded: {exc}") from None
    assistants = [m for m in conversation if m.role == "assistant"]
    if not assistants:
        raise RecordError("no_assistant", "the conversation has no assistant turn to learn from")
    for m in assistants:
        if not (m.content.strip() or m.tool_calls or (m.reasoning or "").strip()):
            raise RecordError("empty_assistant", "an assistant turn has empty content")
