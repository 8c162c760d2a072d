"""Train a tiny byte-level BPE tokenizer in-process and save it as a Hugging Face tokenizer folder.

Why: tests, the offline demo and CI need a real ``transformers.AutoTokenizer`` with a real chat
template, but must not download one. A few hundred merges trained on a built-in corpus take well
under a second and exercise the same code paths (byte-level BPE, special tokens, offsets, Jinja
chat templates) as the Qwen / Llama-3 / DeepSeek-R1 tokenizers we fine-tune in production.

Three chat-template shapes are provided, written for this project:

- ``"chatml"``      ``<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n``
- ``"llama3"``      ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>...``
  (the content is ``trim``-med, as Meta's template does)
- ``"deepseek_r1"`` ``<｜begin▁of▁sentence｜>SYS<｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜>``
  (earlier assistant turns lose their ``<think>…</think>`` part: the template *rewrites* history)

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

#: template name -> (jinja source, bos token or None, eos token)
TEMPLATES: dict[str, tuple[str, str | None, str]] = {
    "chatml": (CHATML_TEMPLATE, None, "<|im_end|>"),
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
    "deepseek_r1": (DEEPSEEK_R1_TEMPLATE, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
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
        template: ``"chatml"``, ``"llama3"`` or ``"deepseek_r1"`` (see the module docstring).
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
