"""Train a tiny byte-level BPE tokenizer in-process and save it as a Hugging Face tokenizer folder.

Why: tests, the offline demo and CI need a real ``transformers.AutoTokenizer`` with a real chat
template, but must not download one. A few hundred merges trained on a built-in corpus take well
under a second and exercise the same code paths (byte-level BPE, special tokens, offsets, Jinja
chat templates) as the Qwen / Llama-3 / DeepSeek-R1 tokenizers we fine-tune in production.

Five chat-template shapes are provided, written for this project:

- ``"chatml"``      ``<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n``
- ``"llama3"``      ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>...``
  (the content is ``trim``-med, as Meta's template does)
- ``"deepseek_r1"`` ``<｜begin▁of▁sentence｜>SYS<｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜>``
  (earlier assistant turns lose their ``<think>…</think>`` part: the template *rewrites* history)
- ``"chatml_tools"`` ChatML with tools as Qwen2.5/Qwen3 lay them out: the tool schemas in the system
  turn inside ``<tools>``, calls as ``<tool_call>\n{"name": …, "arguments": …}\n</tool_call>``, tool
  results as ``<tool_response>`` blocks in a user turn, ``reasoning_content`` as ``<think>…</think>``
  on the assistant turns after the last user turn; content parts are joined
- ``"llama3_tools"`` Llama 3.1's layout: ``Environment: ipython`` in the system turn, the schemas in
  the first user turn, a call as the JSON ``{"name": …, "parameters": …}``, tool results under an
  ``ipython`` header

Example::

    >>> path = save_tiny_tokenizer("/tmp/tok", template="chatml")
    >>> tok = transformers.AutoTokenizer.from_pretrained(path)
    >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    '<|im_start|>user\\nHi<|im_end|>\\n'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

DEEPSEEK_R1_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] %}{% endif %}"
    "{% endfor %}"
    "{{ bos_token }}{{ ns.system }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content and not loop.last %}"
    "{% set content = content.split('</think>')[-1] %}"
    "{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

# A turn's text: a string, or the text of its content parts ([{"type": "text", "text": ...}]).
_TEXT_MACRO = (
    "{%- macro text(c) -%}"
    "{%- if c is string -%}{{ c }}{%- elif c -%}{%- for p in c -%}{{ p.text }}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
# Call i of an assistant turn: OpenAI's {"function": {...}} wrapper or the bare {"name", "arguments"}.
_CALL = "{%- set f = call.function if call.function is defined else call -%}"

CHATML_TOOLS_TEMPLATE = (
    _TEXT_MACRO
    + "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0].role == 'system' -%}{{- text(messages[0].content) + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more of these functions:\\n<tools>' -}}"
    "{%- for t in tools -%}{{- '\\n' + (t | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nWrite each call as <tool_call>\\n{\"name\": <name>, \"arguments\": <object>}"
    "\\n</tool_call><|im_end|>\\n' -}}"
    "{%- elif messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + text(messages[0].content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + text(m.content) + '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if m.reasoning_content and loop.index0 > ns.last_user -%}"
    "{{- '<think>\\n' + m.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- text(m.content) -}}"
    "{%- for call in m.tool_calls or [] -%}" + _CALL
    + "{%- if m.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' -}}"
    "{{- (f.arguments if f.arguments is string else f.arguments | tojson) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + text(m.content) + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAMA3_TOOLS_TEMPLATE = (
    _TEXT_MACRO
    + "{{- bos_token -}}"
    "{%- set ns = namespace(first_user=-1, system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' and ns.first_user < 0 -%}{%- set ns.first_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if messages[0].role == 'system' -%}{%- set ns.system = text(messages[0].content) | trim -%}{%- endif -%}"
    "{%- if tools or ns.system -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}"
    "{%- if tools -%}{{- 'Environment: ipython\\n\\n' -}}{%- endif -%}"
    "{{- ns.system + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}"
    "{%- if tools and loop.index0 == ns.first_user -%}"
    "{{- 'When a function helps, reply with JSON {\"name\": function name, \"parameters\": arguments}.\\n\\n' -}}"
    "{%- for t in tools -%}{{- (t | tojson(indent=4)) + '\\n\\n' -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- (text(m.content) | trim) + '<|eot_id|>' -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- if m.tool_calls -%}"
    "{%- for call in m.tool_calls -%}" + _CALL
    + "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '{\"name\": \"' + f.name + '\", \"parameters\": ' + (f.arguments | tojson) + '}' -}}"
    "{%- endfor -%}"
    "{%- else -%}{{- text(m.content) | trim -}}{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- elif m.role in ['tool', 'ipython'] -%}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + text(m.content) + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

#: template name -> (jinja source, bos token or None, eos token)
TEMPLATES: dict[str, tuple[str, str | None, str]] = {
    "chatml": (CHATML_TEMPLATE, None, "<|im_end|>"),
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
    "deepseek_r1": (DEEPSEEK_R1_TEMPLATE, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "chatml_tools": (CHATML_TOOLS_TEMPLATE, None, "<|im_end|>"),
    "llama3_tools": (LLAMA3_TOOLS_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
}

#: Ordinary (not special) added tokens a template writes, as Qwen's tokenizer has them.
TEMPLATE_ADDED_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml_tools": ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
}

#: Every template's control tokens are registered in every variant, so one vocabulary serves all.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
)

_DEFAULT_CORPUS: tuple[str, ...] = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.",
    "### Instruction:\nSummarise the text.\n\n### Input:\nThe cat sat on the mat.\n\n### Response:\n",
    "You are a helpful assistant. Answer the question briefly and correctly.",
    "What is the capital of France? The capital of France is Paris.",
    "<think>The user asks for a sum. 2 + 3 = 5.</think>The answer is 5.",
    "Write a haiku about the sea. Waves fold into foam, the gull writes its name in salt, "
    "tide erases it.",
    "def add(a, b):\n    return a + b\n",
    "Translate 'good morning' to German: Guten Morgen.",
    "system user assistant human gpt instruction input output response answer question",
    "0123456789 The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!?",
)


def train_tiny_bpe(
    corpus: Iterable[str] | None = None,
    vocab_size: int = 600,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``corpus`` (the built-in one if None).

    Every byte is in the initial alphabet, so any UTF-8 text encodes (no unknown token) and
    decodes back exactly. ``special_tokens`` get the first ids (0, 1, ...) and are never split.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(corpus) if corpus is not None else []
    tokenizer.train_from_iterator(list(_DEFAULT_CORPUS) * 4 + texts, trainer=trainer)
    return tokenizer


def save_tiny_tokenizer(
    out_dir: str | Path,
    template: str = "chatml",
    corpus: Iterable[str] | None = None,
    vocab_size: int = 600,
    extra_tokens: Sequence[str] = (),
    extra_tokens_special: bool = False,
) -> Path:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (with a chat template) to ``out_dir``.

    Args:
        out_dir: folder to create (parents too); returned as a ``Path``.
        template: a name in ``TEMPLATES`` (see the module docstring).
        corpus: extra training text; the built-in corpus is always included.
        vocab_size: BPE vocabulary size including the byte alphabet and special tokens.
        extra_tokens: added tokens such as a ``<short>`` control tag, appended after training.
        extra_tokens_special: register ``extra_tokens`` as special (``skip_special_tokens`` drops
            them) or, by default, as ordinary added tokens, which is how the original usage edits
            the DeepSeek tokenizer.
    """
    if template not in TEMPLATES:
        raise ValueError(
            f"Unknown chat template shape {template!r}; choose one of {sorted(TEMPLATES)}."
        )
    from tokenizers import AddedToken

    chat_template, bos, eos = TEMPLATES[template]
    tokenizer = train_tiny_bpe(corpus, vocab_size)
    if extra_tokens:
        tokenizer.add_tokens(
            [AddedToken(t, special=extra_tokens_special, normalized=False) for t in extra_tokens]
        )
    template_tokens = TEMPLATE_ADDED_TOKENS.get(template, ())
    if template_tokens:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in template_tokens])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out
