"""File side of tokenizer editing: read a tokenizer folder, verify an edit through
``transformers``, and write it atomically (a new folder renamed into place, or in-place file
swaps that are rolled back on failure). The pure editing logic is in ``tokenizer_edit``."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megatron.sft.data.tokenizer_edit import (  # noqa: F401
    TokenizerEditError,
    VerificationError,
    RenameRequest,
    TokenChange,
    TokenizerFiles,
    current_chat_template,
    plan_edit,
    render_files,
    TOKENIZER_JSON,
    CHAT_TEMPLATE_JINJA,
    ROLE_KEYS,
    WEIGHT_SUFFIXES,
    FILE_FIELDS,
)


def read_tokenizer_files(directory: str | Path) -> TokenizerFiles:
    """Parse the tokenizer files of ``directory`` (tokenizer.json is required)."""
    directory = Path(directory)
    if not (directory / TOKENIZER_JSON).is_file():
        raise TokenizerEditError("no tokenizer.json in the tokenizer directory", str(directory),
                                 "Point --tokenizer-model at a Hugging Face tokenizer folder.")
    raw, parsed = {}, {}
    for name, attr in FILE_FIELDS.items():
        path = directory / name
        if not path.is_file():
            continue
        raw[name] = path.read_text(encoding="utf-8")
        if name == CHAT_TEMPLATE_JINJA:
            parsed[attr] = raw[name]
            continue
        try:
            parsed[attr] = json.loads(raw[name])
        except json.JSONDecodeError as exc:
            raise TokenizerEditError(f"{name} is not valid JSON", f"{path}: {exc}",
                                     "Restore the file from the original download.") from None
    return TokenizerFiles(raw=raw, **parsed)


@dataclass
class EditResult:
    changes: list[TokenChange]
    template_changed: bool
    written: dict[str, str]        # file name -> new text
    destination: Path | None       # None for a dry run
    warnings: list[str]

    def summary(self) -> list[str]:
        lines = [f"renamed {c.describe()}" for c in self.changes]
        if self.template_changed:
            lines.append("replaced the chat template")
        names = ", ".join(sorted(self.written))
        lines.append(f"dry run: would write {names}; nothing written" if self.destination is None
                     else f"wrote {names} -> {self.destination}")
        return lines + [f"warning: {w}" for w in self.warnings]


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_folder(src: Path, dst: Path, skip_weights: bool) -> None:
    for item in src.iterdir():
        if skip_weights and (item.is_dir() or item.name.endswith(WEIGHT_SUFFIXES)):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, symlinks=True)
        else:
            shutil.copy2(item, dst / item.name)


def _commit_in_place(directory: Path, written: dict[str, str]) -> None:
    """Write every temp file first, then ``os.replace`` them in turn; if one replace fails, put
    the already replaced files back so the folder is never left half-edited."""
    originals = {n: (directory / n).read_bytes() if (directory / n).exists() else None
                 for n in written}
    temps: dict[str, str] = {}
    done: list[str] = []
    try:
        for name, text in written.items():
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
            temps[name] = tmp
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            if originals[name] is not None:  # mkstemp makes 0600 files; keep the file's mode
                shutil.copymode(directory / name, tmp)
        for name, tmp in temps.items():
            os.replace(tmp, directory / name)
            done.append(name)
    except BaseException:
        for name in done:
            if originals[name] is None:
                (directory / name).unlink(missing_ok=True)
            else:
                _write_text_atomic(directory / name, originals[name].decode("utf-8"))
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
        raise


def verify_tokenizer_dir(directory: str | Path, changes: Sequence[TokenChange],
                        chat_template: str | None = None) -> list[str]:
    """Load ``directory`` with ``transformers.AutoTokenizer`` and check each change took effect.

    Per renamed token: the new name <-> its id both ways, the old name no longer maps to it, it
    encodes as ONE token inside ordinary text, and ``decode(..., skip_special_tokens=True)`` keeps
    it iff it is non-special. Returns the problems found (empty when all is well).
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # noqa: BLE001 - any load failure is a verification failure
        return [f"transformers cannot load the edited tokenizer: {type(exc).__name__}: {exc}"]
    problems = []
    for c in changes:
        name = f"token {c.token_id} {c.new!r}"
        if tok.convert_tokens_to_ids(c.new) != c.token_id:
            problems.append(f"{name}: convert_tokens_to_ids gives "
                            f"{tok.convert_tokens_to_ids(c.new)}")
        if tok.convert_ids_to_tokens(c.token_id) != c.new:
            problems.append(f"{name}: convert_ids_to_tokens gives "
                            f"{tok.convert_ids_to_tokens(c.token_id)!r}")
        if c.renamed and tok.convert_tokens_to_ids(c.old) == c.token_id:
            problems.append(f"{name}: the old name {c.old!r} still maps to it")
        text = f"Hello {c.new} world"
        ids = tok.encode(text, add_special_tokens=False)
        if ids.count(c.token_id) != 1:
            problems.append(f"{name}: {text!r} encodes to {ids}, not one {c.token_id}")
        kept = c.new in tok.decode(ids, skip_special_tokens=True)
        if kept == c.special:
            problems.append(f"{name}: decode(skip_special_tokens=True) "
                            f"{'keeps' if kept else 'drops'} it although it is "
                            f"{'special' if c.special else 'non-special'}")
        stale = [k for k in ROLE_KEYS if c.renamed and getattr(tok, k, None) == c.old]
        if stale:
            problems.append(f"{name}: the loaded tokenizer's {stale[0]} is still {c.old!r}")
        # (a special token need not be in all_special_ids: transformers lists only role tokens
        # and additional/extra special tokens there)
        if not c.special and c.token_id in tok.all_special_ids:
            problems.append(f"{name}: non-special but listed in all_special_ids")
    if chat_template is not None and tok.chat_template != chat_template:
        problems.append("the loaded chat template differs from the requested one")
    return problems


def edit_tokenizer_dir(tokenizer: str | Path, requests: Sequence[RenameRequest],
                       chat_template: str | None = None, output_dir: str | Path | None = None,
                       in_place: bool = False, dry_run: bool = False) -> EditResult:
    """Plan, stage, verify through transformers, then write.

    Exactly one of ``output_dir`` / ``in_place`` unless ``dry_run``. ``output_dir`` must not exist
    (or be empty): it is built as a sibling temp folder (all files copied, edited files replaced),
    verified, then renamed into place. ``in_place`` verifies a copy of the tokenizer files (no
    weights) in a temp folder, then replaces the edited files. Nothing is written when a
    TokenizerEditError or VerificationError is raised.
    """
    source = Path(tokenizer)
    if not source.is_dir():
        raise TokenizerEditError("the tokenizer directory does not exist", str(source),
                                 "Pass --tokenizer-model PATH to a Hugging Face tokenizer folder.")
    if not dry_run and in_place == (output_dir is not None):
        raise TokenizerEditError(
            "choose where to write", "both --in-place and --output-dir" if in_place
            else "neither --in-place nor --output-dir",
            "Pass exactly one of --in-place or --output-dir DIR (or --dry-run).")
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        if out.resolve() == source.resolve():
            raise TokenizerEditError("--output-dir is the tokenizer directory itself", str(out),
                                     "Use --in-place to edit it, or pick another --output-dir.")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise TokenizerEditError("--output-dir already exists and is not empty", str(out),
                                     "Remove it or pick a new --output-dir.")

    files = read_tokenizer_files(source)
    changes, edited, template_changed = plan_edit(files, requests, chat_template)
    written = render_files(edited)
    warnings = []
    final_template = current_chat_template(edited) or ""
    for c in changes:
        if c.renamed and c.old in final_template:
            warnings.append(f"the chat template still mentions the old name {c.old!r}")
    result = EditResult(changes, template_changed, written,
                        None if dry_run else source if in_place else out, warnings)
    expected_template = current_chat_template(edited) if template_changed else None

    def stage_into(folder: Path, skip_weights: bool) -> None:
        _copy_folder(source, folder, skip_weights)
        for name, text in written.items():
            (folder / name).write_text(text, encoding="utf-8", newline="")
        problems = verify_tokenizer_dir(folder, changes, expected_template)
        if problems:
            raise VerificationError(
                "the edited tokenizer failed verification through transformers; nothing was "
                "written:\n  " + "\n  ".join(problems))

    if out is None or dry_run:  # verify a weight-less copy in a throwaway folder
        with tempfile.TemporaryDirectory(prefix="edit_tokenizer-") as tmp:
            stage_into(Path(tmp), skip_weights=True)
        if in_place and not dry_run:
            _commit_in_place(source, written)
        return result

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it 0700; give the usual mode
        stage_into(stage, skip_weights=False)
        if out.exists():
            out.rmdir()  # checked empty above
        os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return result
