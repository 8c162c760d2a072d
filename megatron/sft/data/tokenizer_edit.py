"""Rename added/special tokens and replace the chat template of a Hugging Face tokenizer folder.

Why: the original usage turns a reserved token into a control token by hand-editing two JSON
files (``<|quad_start|>`` id 151650 -> ``<short>``, special -> non-special) and the chat
template. A token's name lives in up to five places (``tokenizer.json`` ``added_tokens``, its
``model.vocab`` and ``post_processor``; ``tokenizer_config.json`` ``added_tokens_decoder`` and
``bos_token``/``eos_token``/...; ``special_tokens_map.json``; ``added_tokens.json``), and missing
one gives a tokenizer that loads but disagrees with itself. This module edits all of them at once.

Two halves:

- pure functions on parsed file contents (``parse_rename``, ``resolve_renames``,
  ``apply_edits``, ``render_files``) that never touch the disk, and
- ``edit_tokenizer_dir``, the file I/O: read, stage the edited folder, verify it through
  ``transformers.AutoTokenizer``, then write atomically (temp files + ``os.replace``).

Example::

    >>> req = parse_rename("<|quad_start|>=<short>:non-special")
    >>> (req.old, req.new, req.special)
    ('<|quad_start|>', '<short>', False)
    >>> files = read_tokenizer_files(path)
    >>> [c.describe() for c in resolve_renames(files, [req])]
    ["151650: '<|quad_start|>' -> '<short>', special -> non-special"]
"""

from __future__ import annotations

import copy
import difflib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS_JSON = "added_tokens.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"

#: keys of tokenizer_config.json / special_tokens_map.json that name one token (a string or an
#: ``{"content": ...}`` dict); such a token must stay special
ROLE_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
             "mask_token")
#: keys that list extra special tokens (transformers 4.x name, then 5.x name)
LIST_KEYS = ("additional_special_tokens", "extra_special_tokens")
SPECIAL_SUFFIXES = {"special": True, "non-special": False}
#: not copied into the verification folder for --in-place (the tokenizer never reads them)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


class TokenizerEditError(ValueError):
    """A user mistake, reported as what was wrong, the value, and the fix (the CLI exits 2)."""

    def __init__(self, what: str, value: Any, fix: str):
        self.what, self.value, self.fix = what, value, fix
        super().__init__(f"{what}: {value!r}. {fix}")


class VerificationError(RuntimeError):
    """The edited tokenizer does not behave as asked when loaded by transformers."""


@dataclass(frozen=True)
class RenameRequest:
    """One ``--rename``/``--rename-id``: pick a token by ``old`` content or ``token_id``."""

    new: str
    old: str | None = None
    token_id: int | None = None
    #: True/False force the special flag; None keeps the token's current one
    special: bool | None = None
    #: the flag as typed, for error messages
    spec: str = ""


@dataclass(frozen=True)
class TokenChange:
    """A resolved rename: what one added token was and what it becomes."""

    token_id: int
    old: str
    new: str
    was_special: bool
    special: bool

    @property
    def renamed(self) -> bool:
        return self.old != self.new

    def describe(self) -> str:
        """``"151650: '<|quad_start|>' -> '<short>', special -> non-special"``"""
        parts = [f"{self.old!r} -> {self.new!r}" if self.renamed else f"{self.old!r}"]
        kind = {True: "special", False: "non-special"}
        if self.special != self.was_special:
            parts.append(f"{kind[self.was_special]} -> {kind[self.special]}")
        else:
            parts.append(f"stays {kind[self.special]}")
        return f"{self.token_id}: " + ", ".join(parts)


@dataclass
class TokenizerFiles:
    """Parsed contents of the files this tool edits; ``None`` where the file is absent."""

    tokenizer_json: dict
    tokenizer_config: dict | None = None
    special_tokens_map: dict | None = None
    added_tokens_json: dict | None = None
    chat_template_jinja: str | None = None
    #: original text per file name, to keep each file's JSON layout and to detect changes
    raw: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- parsing flags
def _split_special_suffix(spec: str) -> tuple[str, bool | None]:
    """``"a=b:non-special"`` -> ``("a=b", False)``; ``"a=b"`` -> ``("a=b", None)``."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail in SPECIAL_SUFFIXES:
        return head, SPECIAL_SUFFIXES[tail]
    return spec, None


def parse_rename(spec: str) -> RenameRequest:
    """``"OLD=NEW[:special|:non-special]"`` -> RenameRequest (split at the first ``=``).

    >>> parse_rename("<|quad_start|>=<short>:non-special")
    RenameRequest(new='<short>', old='<|quad_start|>', token_id=None, special=False, ...)
    """
    body, special = _split_special_suffix(spec)
    old, sep, new = body.partition("=")
    if not sep or not old:
        raise TokenizerEditError(
            "--rename expects OLD=NEW[:special|:non-special]", spec,
            "Write e.g. --rename '<|quad_start|>=<short>:non-special'; for a name containing "
            "'=' use --rename-id ID=NEW.")
    return RenameRequest(new=_check_new_name(new, spec), old=old, special=special, spec=spec)


def parse_rename_id(spec: str) -> RenameRequest:
    """``"ID=NEW[:special|:non-special]"`` -> RenameRequest, e.g. ``"151650=<short>"``."""
    body, special = _split_special_suffix(spec)
    raw_id, sep, new = body.partition("=")
    if not sep or not raw_id.strip().isdigit():
        raise TokenizerEditError(
            "--rename-id expects ID=NEW[:special|:non-special] with a non-negative integer ID",
            spec, "Write e.g. --rename-id '151650=<short>:non-special'.")
    return RenameRequest(new=_check_new_name(new, spec), token_id=int(raw_id), special=special,
                         spec=spec)


def _check_new_name(new: str, spec: str) -> str:
    if not new or new != new.strip():
        raise TokenizerEditError(
            "the new token name is empty or has leading/trailing whitespace", spec,
            "Give a visible name such as <short>.")
    return new


# --------------------------------------------------------------------------- resolving
def _vocab_ids(tokenizer_json: dict) -> dict[str, int]:
    """The model's own vocabulary (BPE/WordPiece/WordLevel dict, or Unigram [piece, score] list)."""
    vocab = tokenizer_json.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        return dict(vocab)
    if isinstance(vocab, list):
        return {entry[0]: i for i, entry in enumerate(vocab)}
    return {}


def _role_tokens(config: dict | None) -> dict[str, str]:
    """``{"eos_token": "<|im_end|>", ...}`` for the role keys a config sets."""
    roles = {}
    for key in ROLE_KEYS:
        value = (config or {}).get(key)
        content = value.get("content") if isinstance(value, dict) else value
        if isinstance(content, str):
            roles[key] = content
    return roles


def _id_summary(ids: Sequence[int], limit: int = 8) -> str:
    ids = sorted(ids)
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f", ... ({len(ids)} in all, up to {ids[-1]})" if len(ids) > limit else "")


def resolve_renames(files: TokenizerFiles, requests: Sequence[RenameRequest]) -> list[TokenChange]:
    """Check every request against the tokenizer and return one TokenChange per request.

    Refuses (TokenizerEditError): ids or names that are not added tokens, a token picked twice,
    renames that change nothing, new names that another token has after all renames (so swapping
    two names in one call is allowed), and making a bos/eos/pad/... token non-special.
    """
    added = {t["id"]: t for t in files.tokenizer_json.get("added_tokens", [])}
    by_content = {t["content"]: i for i, t in added.items()}
    vocab = _vocab_ids(files.tokenizer_json)
    vocab_by_id = {i: piece for piece, i in vocab.items()}

    changes: list[TokenChange] = []
    for req in requests:
        if req.token_id is not None:
            token_id = req.token_id
            if token_id not in added:
                if token_id in vocab_by_id:
                    raise TokenizerEditError(
                        f"token id {token_id} is an ordinary vocabulary token "
                        f"({vocab_by_id[token_id]!r}), not an added token", req.spec,
                        "Only tokens listed in tokenizer.json 'added_tokens' can be renamed; "
                        f"those ids are {_id_summary(list(added))}.")
                raise TokenizerEditError(
                    f"token id {token_id} does not exist in this tokenizer", req.spec,
                    f"Pick an added-token id: {_id_summary(list(added))}.")
        else:
            if req.old not in by_content:
                close = difflib.get_close_matches(req.old, list(by_content), n=3, cutoff=0.5)
                hint = f"Did you mean {', '.join(map(repr, close))}? " if close else ""
                where = ("it is an ordinary vocabulary token, not an added token"
                         if req.old in vocab else "no added token has this content")
                raise TokenizerEditError(
                    f"cannot rename {req.old!r}: {where}", req.spec,
                    hint + "Use the exact current content, or --rename-id ID=NEW.")
            token_id = by_content[req.old]
        entry = added[token_id]
        was_special = bool(entry.get("special", False))
        special = was_special if req.special is None else req.special
        change = TokenChange(token_id, entry["content"], req.new, was_special, special)
        if not change.renamed and special == was_special:
            raise TokenizerEditError(
                f"this rename changes nothing (token {token_id} is already {req.new!r}, "
                f"{'special' if special else 'non-special'})", req.spec,
                "Drop it, or give a new name or :special / :non-special.")
        if any(c.token_id == token_id for c in changes):
            raise TokenizerEditError(f"token {token_id} ({change.old!r}) is renamed twice",
                                     req.spec, "Give one rename per token.")
        changes.append(change)

    _check_names_free(changes, added, vocab)
    _check_roles_stay_special(files, changes)
    return changes


def _check_names_free(changes: Sequence[TokenChange], added: dict, vocab: dict[str, int]) -> None:
    """Each new name must belong to no other token once every rename is applied."""
    final = {i: t["content"] for i, t in added.items()}
    final_vocab = dict(vocab)
    for c in changes:
        final[c.token_id] = c.new
        if final_vocab.get(c.old) == c.token_id:
            del final_vocab[c.old]
    for c in changes:
        if not c.renamed:
            continue
        others = [i for i, content in final.items() if content == c.new and i != c.token_id]
        if final_vocab.get(c.new, c.token_id) != c.token_id:
            others.append(final_vocab[c.new])
        if others:
            raise TokenizerEditError(
                f"the new name {c.new!r} for token {c.token_id} is already taken by token "
                f"id {others[0]}", c.new,
                "Pick an unused name, or rename that token too in the same call.")


def _check_roles_stay_special(files: TokenizerFiles, changes: Sequence[TokenChange]) -> None:
    roles = {**_role_tokens(files.special_tokens_map), **_role_tokens(files.tokenizer_config)}
    for c in changes:
        for key, content in roles.items():
            if content == c.old and not c.special:
                raise TokenizerEditError(
                    f"token {c.token_id} ({c.old!r}) is the tokenizer's {key} and must stay "
                    "special", c.old, "Drop ':non-special' for it, or pick another token.")


def check_chat_template(source: str) -> None:
    """Compile ``source`` the way transformers does; raise TokenizerEditError on a syntax error."""
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # older/newer transformers: plain Jinja with the extension HF enables
        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
        _compile_jinja_template = env.from_string
    try:
        _compile_jinja_template(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerEditError("the chat template is not valid Jinja", f"line {exc.lineno}: "
                                 f"{exc.message}", "Fix the template file and run again.") from None


# --------------------------------------------------------------------------- applying
def _replace_strings(node: Any, renames: dict[str, str]) -> Any:
    """Rename exact string values and dict keys anywhere in ``node`` (post_processor only)."""
    if isinstance(node, str):
        return renames.get(node, node)
    if isinstance(node, list):
        return [_replace_strings(x, renames) for x in node]
    if isinstance(node, dict):
        return {renames.get(k, k): _replace_strings(v, renames) for k, v in node.items()}
    return node


def _edit_special_tokens(data: dict, changes: Sequence[TokenChange]) -> None:
    """Role keys and additional/extra special token lists of a config or special_tokens_map."""
    renames = {c.old: c.new for c in changes if c.renamed}
    demoted = {c.new for c in changes if not c.special}
    for key in ROLE_KEYS:
        value = data.get(key)
        if isinstance(value, str):
            data[key] = renames.get(value, value)
        elif isinstance(value, dict) and isinstance(value.get("content"), str):
            value["content"] = renames.get(value["content"], value["content"])
    for key in LIST_KEYS:
        if isinstance(data.get(key), dict):  # transformers 5 named form {"image_token": "<x>"}
            data[key] = {k: renames.get(v, v) if isinstance(v, str) else v
                         for k, v in data[key].items()}
        if not isinstance(data.get(key), list):
            continue
        kept = []
        for item in data[key]:
            content = item.get("content") if isinstance(item, dict) else item
            new = renames.get(content, content)
            if new in demoted:  # listed here, transformers would count it special again
                continue
            if isinstance(item, dict):
                item = {**item, "content": new}
            else:
                item = new
            kept.append(item)
        data[key] = kept


def apply_edits(files: TokenizerFiles, changes: Sequence[TokenChange],
                chat_template: str | None = None) -> TokenizerFiles:
    """Return a copy of ``files`` with ``changes`` (and the new chat template) applied everywhere.

    Example: renaming 151650 ``<|quad_start|>`` -> ``<short>`` non-special sets, in the copy,
    ``added_tokens[...]["content"] = "<short>"`` and ``["special"] = False`` in tokenizer.json,
    the same two fields of ``added_tokens_decoder["151650"]`` in tokenizer_config.json, renames
    ``model.vocab["<|quad_start|>"]`` if the token is there, and drops it from
    ``additional_special_tokens``.
    """
    out = replace(files, tokenizer_json=copy.deepcopy(files.tokenizer_json),
                  tokenizer_config=copy.deepcopy(files.tokenizer_config),
                  special_tokens_map=copy.deepcopy(files.special_tokens_map),
                  added_tokens_json=copy.deepcopy(files.added_tokens_json))
    by_id = {c.token_id: c for c in changes}
    renames = {c.old: c.new for c in changes if c.renamed}

    tj = out.tokenizer_json
    for entry in tj.get("added_tokens", []):
        if entry["id"] in by_id:
            entry["content"], entry["special"] = by_id[entry["id"]].new, by_id[entry["id"]].special
    model = tj.get("model") or {}
    vocab = model.get("vocab")
    for c in changes:
        if not c.renamed:
            continue
        if isinstance(vocab, dict) and vocab.get(c.old) == c.token_id:
            model["vocab"] = vocab = {(c.new if k == c.old else k): v for k, v in vocab.items()}
        elif isinstance(vocab, list) and c.token_id < len(vocab) and vocab[c.token_id][0] == c.old:
            vocab[c.token_id] = [c.new, *vocab[c.token_id][1:]]
        if model.get("unk_token") == c.old:
            model["unk_token"] = c.new
    if tj.get("post_processor") and renames:
        tj["post_processor"] = _replace_strings(tj["post_processor"], renames)

    if out.tokenizer_config is not None:
        decoder = out.tokenizer_config.get("added_tokens_decoder") or {}
        for key, entry in decoder.items():
            if int(key) in by_id:
                entry["content"], entry["special"] = by_id[int(key)].new, by_id[int(key)].special
        _edit_special_tokens(out.tokenizer_config, changes)
    if out.special_tokens_map is not None:
        _edit_special_tokens(out.special_tokens_map, changes)
    if out.added_tokens_json is not None:
        out.added_tokens_json = {renames.get(k, k): v for k, v in out.added_tokens_json.items()}

    if chat_template is not None:
        _set_chat_template(out, chat_template)
    return out


def _set_chat_template(files: TokenizerFiles, template: str) -> None:
    """Write the template wherever the folder keeps one (chat_template.jinja and/or the config's
    ``chat_template``); with neither, into tokenizer_config.json as the original usage does."""
    config = files.tokenizer_config
    in_config = config is not None and "chat_template" in config
    if files.chat_template_jinja is not None:
        files.chat_template_jinja = template
    if in_config and isinstance(config["chat_template"], list):  # [{"name", "template"}, ...]
        named = [t for t in config["chat_template"] if t.get("name") == "default"]
        if not named:
            raise TokenizerEditError(
                "tokenizer_config.json has several named chat templates and none is 'default'",
                [t.get("name") for t in config["chat_template"]],
                "Edit the named template by hand; this tool replaces the default one.")
        named[0]["template"] = template
    elif in_config or files.chat_template_jinja is None:
        if config is None:
            files.chat_template_jinja = template
        else:
            config["chat_template"] = template


def current_chat_template(files: TokenizerFiles) -> str | None:
    """The template transformers would load: chat_template.jinja wins over the config's."""
    if files.chat_template_jinja is not None:
        return files.chat_template_jinja
    template = (files.tokenizer_config or {}).get("chat_template")
    if isinstance(template, list):
        return next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def plan_edit(files: TokenizerFiles, requests: Sequence[RenameRequest],
              chat_template: str | None) -> tuple[list[TokenChange], TokenizerFiles, bool]:
    """Validate and apply in memory; raises TokenizerEditError if the call would change nothing."""
    changes = resolve_renames(files, requests)
    template_changed = chat_template is not None and chat_template != current_chat_template(files)
    if chat_template is not None:
        check_chat_template(chat_template)
    if not changes and not template_changed:
        raise TokenizerEditError(
            "nothing to change", "the chat template is identical" if chat_template is not None
            else "no --rename, --rename-id or --chat-template given",
            "Pass at least one --rename OLD=NEW, --rename-id ID=NEW or --chat-template FILE "
            "that differs from the current tokenizer.")
    edited = apply_edits(files, changes, chat_template if template_changed else None)
    return changes, edited, template_changed


# --------------------------------------------------------------------------- serialising
FILE_FIELDS = {TOKENIZER_JSON: "tokenizer_json", TOKENIZER_CONFIG: "tokenizer_config",
               SPECIAL_TOKENS_MAP: "special_tokens_map", ADDED_TOKENS_JSON: "added_tokens_json",
               CHAT_TEMPLATE_JINJA: "chat_template_jinja"}


def _dump_json_like(obj: Any, original: str | None) -> str:
    """JSON in the original file's layout: compact if it was one line, else indented like it."""
    if original is not None and "\n" not in original.strip():
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    indent = 2
    if original is not None:
        lines = original.splitlines()
        if len(lines) > 1:
            indent = (len(lines[1]) - len(lines[1].lstrip(" "))) or 2
    text = json.dumps(obj, ensure_ascii=False, indent=indent)
    return text + "\n" if original is None or original.endswith("\n") else text


def render_files(files: TokenizerFiles) -> dict[str, str]:
    """File name -> new text, for the files whose content differs from ``files.raw``."""
    out = {}
    for name, attr in FILE_FIELDS.items():
        value = getattr(files, attr)
        if value is None:
            continue
        original = files.raw.get(name)
        if name == CHAT_TEMPLATE_JINJA:
            text = value
        else:
            if original is not None and json.loads(original) == value:
                continue
            text = _dump_json_like(value, original)
        if text != original:
            out[name] = text
    return out
