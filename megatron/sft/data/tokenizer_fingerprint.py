"""What a tokenizer *is*, as a short content hash, so that data tokenized with one tokenizer is
never trained with a model that ships another of the same size.

Two tokenizers with the same vocabulary size can give the same id to different text (another
training corpus, a renamed token): the ids of data made with one decode to nonsense with the
other. The pre-tokenizer records ``tokenizer_fingerprint`` in ``<prefix>_stats.json``; training
compares it with the fingerprint of the model's tokenizer (the ``--load`` HF directory, or the
one a checkpoint's exports copy).

The hash covers what decides ids and text: the vocabulary (token -> id), the BPE merges (as
pairs, whichever of the two ``tokenizer.json`` spellings a library version writes), and the
added tokens (id, text, special or not), read from the ``tokenizers`` JSON of the loaded
tokenizer. Formatting, key order and settings that do not change ids are left out, so a
tokenizer saved with ``save_pretrained`` and loaded again keeps its fingerprint.

Example::

    tokenizer_fingerprint(load_pretokenizer_tokenizer("tok/"))   # 'sha256:3f9a0c1d2b4e5f60'
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

#: files whose presence makes a directory hold a tokenizer worth comparing
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def fingerprint_of_json(data: dict[str, Any]) -> str:
    """The fingerprint of a ``tokenizer.json`` document (already parsed)."""
    model = data.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):  # BPE / WordPiece: token -> id, listed by id
        vocab = sorted(vocab.items(), key=lambda item: (item[1], item[0]))
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m)
              for m in model.get("merges") or []]
    added = sorted((t.get("id"), t.get("content"), bool(t.get("special")))
                   for t in data.get("added_tokens") or [])
    blob = json.dumps({"type": model.get("type"), "vocab": vocab, "merges": merges,
                       "added": added}, ensure_ascii=False, sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> Optional[str]:
    """The fingerprint of a loaded tokenizer (a transformers fast tokenizer, our
    ``JsonTokenizer`` or a ``tokenizers.Tokenizer``); ``None`` for one without a ``tokenizers``
    backend (a slow sentencepiece tokenizer: nothing is compared)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    to_str = getattr(backend, "to_str", None)
    if to_str is None:
        return None
    return fingerprint_of_json(json.loads(to_str()))


def directory_fingerprint(directory: "str | Path") -> Optional[str]:
    """The fingerprint of the tokenizer in ``directory`` as the pre-tokenizer would load it;
    ``None`` when the directory holds no tokenizer or it cannot be loaded."""
    from megatron.sft.data.preprocess import load_pretokenizer_tokenizer

    directory = Path(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return tokenizer_fingerprint(load_pretokenizer_tokenizer(str(directory)))
    except Exception:  # an unloadable tokenizer: nothing to compare (exports say more)
        return None
