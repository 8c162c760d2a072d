"""Outputs never overwrite inputs: refuse an output directory that is, contains or lies inside
an input, before anything is written and whatever ``--force`` says (pure: paths only).

Example: output ``hf/qwen`` with input ``hf/qwen`` (the same), ``hf`` (the output would contain
the input) or ``hf/qwen/mg`` (the output would be inside the input) are all refused;
``hf/qwen_Megatron_TP1PP1`` beside ``hf/qwen`` is fine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def _real(path: "str | Path") -> Path:
    """Absolute, symlinks resolved (a path that does not exist yet resolves as far as it can)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def overlap(output: "str | Path", input_path: "str | Path") -> Optional[str]:
    """How ``output`` overlaps ``input_path``: ``"is"``, ``"contains"``, ``"is inside"`` or None."""
    out, src = _real(output), _real(input_path)
    if out == src:
        return "is"
    if out in src.parents:
        return "contains"
    if src in out.parents:
        return "is inside"
    return None


def check_output_separate(output: "str | Path", output_flag: str,
                          inputs: dict[str, "str | Path | None"]) -> None:
    """Raise ``ValueError`` if ``output`` overlaps any of ``inputs`` (flag -> path; None skipped).

    The output is replaced as a whole (``--force``) or built beside it and renamed over it, so
    any overlap would delete or corrupt the input.
    """
    for flag, path in inputs.items():
        if path is None:
            continue
        how = overlap(output, path)
        if how is None:
            continue
        relation = {"is": "is the same directory as", "contains": "contains",
                    "is inside": "is inside"}[how]
        raise ValueError(
            f"{output_flag} {output} {relation} the input {flag} {path}: writing it would "
            f"destroy the input, so this is refused even with --force/FORCE=1. Choose an output "
            f"directory that neither is, contains nor lies inside {path}"
        )
