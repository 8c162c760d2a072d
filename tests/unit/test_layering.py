"""Imports flow down the tiers, never back: quickstart -> training -> model -> lora -> bridge /
data -> runtime. A package may import its own tier and the ones below it; bridge and data are one tier
that does not import each other (the reverse would let checkpoint code depend on tokenizers).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1].parent / "megatron" / "sft"
#: package -> the packages of ours it may import (besides itself)
ALLOWED = {
    "runtime": set(),
    "data": {"runtime"},
    "bridge": {"runtime"},
    "lora": {"bridge", "runtime"},
    "model": {"lora", "bridge", "runtime"},
    "training": {"model", "lora", "bridge", "data", "runtime"},
    "quickstart": {"training", "model", "lora", "bridge", "data", "runtime"},
}


def _our_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["megatron", "sft"] and len(parts) > 2:
                yield node.lineno, parts[2]


def test_every_package_has_a_tier():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ALLOWED), f"give {packages ^ set(ALLOWED)} a tier in ALLOWED"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_down(package):
    bad = []
    for f in sorted((ROOT / package).rglob("*.py")):
        for line, target in _our_imports(f):
            if target != package and target in ALLOWED and target not in ALLOWED[package]:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports megatron.sft.{target}")
    assert not bad, "\n".join(bad)

