"""Prompts for the sample generations a run prints at each evaluation (``--eval-generate``), and
the tokens that end a turn. Pure: token lists in, token lists out (the tokenizer is passed in).

A prompt is a conversation cut before its first assistant turn, in the tokens the model trains
on. For a pre-tokenized sample (``ids`` + loss ``mask``) that is everything before the first
learned token; the reference answer is the first run of learned tokens (the turn and its
end-of-turn token)::

    ids   <|im_start|> user \\n Hi <|im_end|> \\n <|im_start|> assistant \\n Hello <|im_end|> \\n
    mask       0        0    0  0      0      0       0          0      0    1       1      0
    prompt = the first 9 tokens          reference = [Hello, <|im_end|>]

A record of ``--eval-prompts FILE`` (any format the pre-tokenizer reads) is rendered by the
pre-tokenizer's own :class:`~megatron.sft.data.render.ConversationRenderer` and cut the same
way, so the prompt is token for token what training saw before that answer. A record without an
assistant turn (a prompt only) is rendered with the chat template's generation prompt
(``apply_chat_template(messages, add_generation_prompt=True)``), as at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from megatron.sft.data.chat_template import template_message
from megatron.sft.data.formats import RECORD_FORMATS, RecordError, detect_format
from megatron.sft.data.readers import InputError, iter_records, parse_payload
from megatron.sft.data.render import ConversationRenderer, RenderConfig

#: a probe conversation whose rendering shows the template's end-of-turn token
_PROBE = {"messages": [{"role": "user", "content": "ping"},
                       {"role": "assistant", "content": "pong"}]}


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt to continue: its tokens, the answer training would learn (empty for a
    prompt-only record) and where it came from (shown in the log)."""

    ids: tuple[int, ...]
    reference: tuple[int, ...]
    source: str


def cut_before_first_answer(ids: Sequence[int], mask: Sequence[int]
                            ) -> tuple[list[int], list[int]]:
    """``(prompt, reference)``: the tokens before the first learned one, and the first run of
    learned tokens.

    >>> cut_before_first_answer([5, 6, 7, 8, 9, 10], [0, 0, 1, 1, 0, 1])
    ([5, 6], [7, 8])
    >>> cut_before_first_answer([5, 6], [0, 0])
    ([5, 6], [])
    """
    ids, mask = [int(i) for i in ids], [int(m) for m in mask]
    if len(ids) != len(mask):
        raise ValueError(f"{len(ids)} token ids but {len(mask)} loss-mask values")
    first = next((j for j, m in enumerate(mask) if m), len(ids))
    stop = next((j for j in range(first, len(ids)) if not mask[j]), len(ids))
    return ids[:first], ids[first:stop]


def prompts_from_samples(samples: Sequence[tuple[Sequence[int], Sequence[int], str]]
                         ) -> list[EvalPrompt]:
    """``(ids, mask, source)`` samples (e.g. the first validation samples) -> prompts; a sample
    learned from its first token on (``--loss-on all``) has no prompt and is left out."""
    out = []
    for ids, mask, source in samples:
        prompt, reference = cut_before_first_answer(ids, mask)
        if prompt:
            out.append(EvalPrompt(tuple(prompt), tuple(reference), source))
    return out


def renderer_for(tokenizer: Any) -> ConversationRenderer:
    """The pre-tokenizer's renderer with its defaults (the tokenizer's chat template, every
    assistant turn learned), or a ``ValueError`` saying what the tokenizer lacks."""
    return ConversationRenderer(tokenizer, RenderConfig())


def prompt_from_record(record: Any, renderer: ConversationRenderer, source: str) -> EvalPrompt:
    """One ``--eval-prompts`` record -> its prompt (see the module docstring); ``RecordError``
    when the pre-tokenizer would drop it for another reason than having no answer."""
    result = renderer.render_batch([record])[0]
    if not isinstance(result, RecordError):
        prompt, reference = cut_before_first_answer(result.ids, result.mask)
        return EvalPrompt(tuple(prompt), tuple(reference), source)
    if result.reason != "no_assistant":
        raise result
    fields = renderer.config.fields
    fmt = renderer.config.format
    if fmt == "auto":
        fmt = fields.implied_format() or detect_format(record, fields)
    conversation = RECORD_FORMATS[fmt].convert(record, fields)  # unvalidated: no answer needed
    if renderer.template is None:
        raise RecordError("no_assistant", "a prompt-only record needs a chat template")
    text = renderer.template([template_message(m) for m in conversation],
                             getattr(conversation, "tools", None), add_generation_prompt=True)
    ids = renderer.backend.encode(text, add_special_tokens=False).ids
    return EvalPrompt(tuple(ids), (), source)


def prompts_from_file(path: str, renderer: ConversationRenderer, limit: int) -> list[EvalPrompt]:
    """The first ``limit`` records of ``--eval-prompts`` as prompts; a record that cannot be one
    is a ``ValueError`` naming the file, its line and the reason."""
    if not Path(path).exists():
        raise ValueError(f"--eval-prompts {path}: no such file; give a JSONL file of "
                         "conversations (any format tools/preprocess_data_sft.py reads)")
    out: list[EvalPrompt] = []
    try:
        records = iter_records(path)
        raws = [raw for _, raw in zip(range(limit), records)]
    except InputError as err:
        raise ValueError(f"--eval-prompts {path}: {err}") from None
    for raw in raws:
        where = f"{raw.source}:{raw.line}"
        try:
            out.append(prompt_from_record(parse_payload(raw.payload), renderer, where))
        except RecordError as err:
            raise ValueError(f"--eval-prompts {where}: {err.reason}: {err}; fix or remove "
                             "that record") from None
    if not out:
        raise ValueError(f"--eval-prompts {path} holds no record; give at least one "
                         "conversation")
    return out


def stop_token_ids(renderer: ConversationRenderer) -> tuple[int, ...]:
    """Tokens that end a generated turn: the end-of-turn token the pre-tokenizer learns after
    an assistant turn of the chat template (``<|im_end|>``, ``<|eot_id|>``, ...), found by
    rendering a probe conversation, and the tokenizer's EOS token.

    Example (ChatML, EOS ``<|endoftext|>``): ``(id of <|im_end|>, id of <|endoftext|>)``.
    """
    out: list[int] = []
    probe = renderer.render_batch([_PROBE])[0]
    if not isinstance(probe, RecordError):
        _, reference = cut_before_first_answer(probe.ids, probe.mask)
        if reference and reference[-1] in renderer.special_ids:
            out.append(reference[-1])
    eos = getattr(renderer.tokenizer, "eos_token_id", None)
    if eos is not None and eos not in out:
        out.append(int(eos))
    return tuple(out)
