"""Compile a chat template exactly as ``transformers``' ``apply_chat_template`` does, without it.

Importing ``transformers`` costs seconds (it pulls in torch); pre-tokenization needs only its
Jinja set-up. This is ``transformers.utils.chat_template_utils._cached_compile_jinja_template``
(5.x) re-stated: an ``ImmutableSandboxedEnvironment`` with ``trim_blocks``/``lstrip_blocks``,
``loopcontrols``, the ``{% generation %}`` tag, the ``tojson`` filter and the globals
``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``; plus ``alias_reasoning_fields``
(its ``_alias_reasoning_fields``). Tests render every tiny template both ways and compare.

One difference that changes no output: the sandbox's attribute check (``is_safe_attribute``)
is remembered per (type, attribute) for the plain JSON types a chat holds (``str``, ``dict``,
``list``...) and the template's ``namespace`` objects, where the answer depends on nothing else
(jinja's check looks at the object's type and the name only); jinja recomputes it on every
access (``ns.is_tool``), which was half of a DeepSeek-R1 render.

Example::

    template = compile_chat_template("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    template.render(messages=[{"role": "user", "content": "hi"}])   # -> 'HI'
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: names a message's reasoning is passed under (transformers' ``_REASONING_FIELDS``)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

#: types whose attribute safety depends only on (type, name): what JSON records are made of
_PLAIN_TYPES = frozenset((str, dict, list, tuple, int, float, bool, type(None)))


def alias_reasoning_fields(chat: list) -> list:
    """``[{"role": "assistant", "reasoning": "r"}]`` -> ``[{"thinking": "r", "role": "assistant",
    "reasoning": "r", "reasoning_content": "r"}]``: the first reasoning field found is copied to
    the names templates read, as ``apply_chat_template`` does before rendering."""
    aliased = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """The sandbox transformers uses, with the per-type attribute check remembered."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._safe: dict[tuple[type, str], bool] = {}

    def is_safe_attribute(self, obj, attr, value) -> bool:
        kind = type(obj)
        if kind not in _PLAIN_TYPES and kind is not _TemplateNamespace:
            return super().is_safe_attribute(obj, attr, value)
        key = (kind, attr)
        safe = self._safe.get(key)
        if safe is None:
            safe = self._safe[key] = super().is_safe_attribute(obj, attr, value)
        return safe


class _AssistantTracker(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body (transformers tracks where it
    lands for ``return_assistant_tokens_mask``; we locate turns ourselves)."""

    tags = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        environment.extend(activate_tracker=self.activate_tracker)
        self._tracking = ContextVar("assistant_tracker", default=None)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

    @jinja2.pass_eval_context
    def _generation_support(self, context, caller) -> str:
        rv = caller()
        if (tracking := self._tracking.get()) is not None:
            rendered_blocks, generation_indices = tracking
            start_index = len("".join(rendered_blocks))
            generation_indices.append((start_index, start_index + len(rv)))
        return rv

    @contextmanager
    def activate_tracker(self, rendered_blocks, generation_indices):
        token = self._tracking.set((rendered_blocks, generation_indices))
        try:
            yield
        finally:
            self._tracking.reset(token)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # not jinja's own tojson, which escapes HTML characters
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` for templates, without the class itself (no attribute access to break out)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed names."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                "Please rename the attribute."
            )


@lru_cache
def compile_chat_template(source: str) -> jinja2.Template:
    """The compiled template, as ``apply_chat_template`` would render ``source`` (cached)."""
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True,
                       extensions=[_AssistantTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)
