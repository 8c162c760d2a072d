"""A tokenizer folder read with the ``tokenizers`` library alone, when that is exact.

``AutoTokenizer`` imports ``transformers`` (seconds, torch included) to hand the pre-tokenizer a
Rust tokenizer, a chat template and a few special-token names. For the generic fast class
(``PreTrainedTokenizerFast``) transformers uses ``tokenizer.json`` as it is, so reading it with
``tokenizers.Tokenizer.from_file`` gives the same encodings; ``load_json_tokenizer`` does so only
when nothing in the folder would make transformers change it, and returns ``None`` otherwise
(the caller then uses ``AutoTokenizer``). Refused, for example: a model-specific class
(``LlamaTokenizerFast`` may rebuild the pipeline), a special token that is not already a special
added token of ``tokenizer.json`` (transformers would add it), ``added_tokens_decoder`` entries
that differ from it, truncation or padding stored in it, or a chat template in its own file.

Example::

    tok = load_json_tokenizer("tok/")      # tokenizer.json + tokenizer_config.json
    tok.backend_tokenizer.encode("Hi").ids, tok.eos_token, tok.chat_template[:20]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

#: classes whose transformers loader takes tokenizer.json as it is
GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
#: transformers' ``SPECIAL_TOKENS_ATTRIBUTES``: the names ``special_tokens_map`` holds
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
#: files beside tokenizer_config.json that transformers reads a chat template from
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "additional_chat_templates")


class AddedToken(NamedTuple):
    """What ``added_tokens_decoder[id]`` answers that the renderer reads."""

    content: str
    special: bool


def _token_text(value: Any) -> str | None:
    """``"<s>"`` or ``{"content": "<s>", "__type": "AddedToken", ...}`` -> ``"<s>"``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class JsonTokenizer:
    """The attributes of a transformers fast tokenizer that pre-tokenization uses."""

    backend_tokenizer: Any
    """The ``tokenizers.Tokenizer`` of ``tokenizer.json``."""
    chat_template: str | None
    special_tokens_map: dict[str, str]
    """``{"bos_token": "<s>", "eos_token": "</s>", ...}``: the named tokens that are set."""
    added_tokens_decoder: dict[int, AddedToken]

    def __init__(self, backend: Any, config: dict, added: list[dict]):
        self.backend_tokenizer = backend
        template = config.get("chat_template")
        self.chat_template = template if isinstance(template, str) else None
        self.special_tokens_map = {name: _token_text(config[name]) for name in SPECIAL_TOKEN_NAMES
                                   if _token_text(config.get(name)) is not None}
        self.added_tokens_decoder = {t["id"]: AddedToken(t["content"], bool(t.get("special")))
                                     for t in sorted(added, key=lambda t: t["id"])}

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_chat_template(self) -> str | None:
        return self.chat_template

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend_tokenizer.token_to_id(self.bos_token)


def _config_refusal(folder: Path) -> str | None:
    """What in the folder's files (tokenizer.json aside) transformers would act on."""
    config_path = folder / "tokenizer_config.json"
    if not (config_path.is_file() and (folder / "tokenizer.json").is_file()):
        return "no tokenizer.json + tokenizer_config.json"
    if any((folder / name).exists() for name in TEMPLATE_FILES):
        return "a chat template file beside tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") not in GENERIC_CLASSES:
        return f"tokenizer_class {config.get('tokenizer_class')!r}"
    if not isinstance(config.get("chat_template", ""), str):
        return "several named chat templates"
    if config.get("additional_special_tokens") or config.get("extra_special_tokens"):
        return "additional special tokens in tokenizer_config.json"
    return None


def _backend_refusal(backend: Any, config: dict) -> str | None:
    """What transformers would change in the loaded ``tokenizer.json``."""
    if backend.truncation is not None or backend.padding is not None:
        return "truncation or padding stored in tokenizer.json"
    by_id = backend.get_added_tokens_decoder()
    added = {t.content: t for t in by_id.values()}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name))
        if config.get(name) is not None and (text is None or text not in added or not added[text].special):
            return f"{name} {text!r} is not a special added token of tokenizer.json"
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        mine = by_id.get(int(key))
        if mine is None or any(entry.get(k) != getattr(mine, k) for k in
                               ("content", "special", "lstrip", "rstrip", "normalized", "single_word")):
            return f"added_tokens_decoder[{key}] differs from tokenizer.json"
    return None


def _load(folder: Path) -> tuple[str | None, JsonTokenizer | None]:
    refusal = _config_refusal(folder)
    if refusal is not None:
        return refusal, None
    from tokenizers import Tokenizer

    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    refusal = _backend_refusal(backend, config)
    if refusal is not None:
        return refusal, None
    added = [{"id": i, "content": t.content, "special": t.special}
             for i, t in backend.get_added_tokens_decoder().items()]
    return None, JsonTokenizer(backend, config, added)


def json_tokenizer_refusal(folder: str | Path) -> str | None:
    """Why ``folder`` must go through transformers, or None when ``tokenizers`` alone is exact."""
    return _load(Path(folder))[0]


def load_json_tokenizer(folder: str | Path) -> JsonTokenizer | None:
    """The folder's tokenizer without transformers, or None where that could differ from it."""
    return _load(Path(folder))[1]
