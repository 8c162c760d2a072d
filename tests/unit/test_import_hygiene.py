"""Pure modules never import torch.distributed or megatron-core's parallel state, so they
test (and run in data workers) without a process group."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "megatron" / "sft"
PURE = ["bridge/transforms.py", "bridge/model_shape.py", "bridge/rules.py",
        "bridge/stage_mapping.py", "bridge/architectures", "lora/split.py", "lora/settings.py",
        "lora/bases.py", "runtime/layout.py", "training/batch.py",
        "model/attention/", "model/context_parallel/split.py", "model/context_parallel/kernels.py",
        "model/norms.py", "model/tp_attributes.py", "model/layer_impl.py", "model/config.py"]
#: modules inside a pure folder that build a layer (its tensor-parallel linears), not math
BUILDS_LAYERS = {"model/attention/mla.py"}
FORBIDDEN = ("torch.distributed", "megatron.core.parallel_state", "megatron.core.tensor_parallel")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


@pytest.mark.parametrize("rel", PURE)
def test_pure_module_imports(rel):
    target = ROOT / rel
    files = sorted(target.glob("*.py")) if target.is_dir() else [target]
    assert files
    for f in files:
        if str(f.relative_to(ROOT)) in BUILDS_LAYERS:
            continue
        bad = [m for m in _imports(f) if m.startswith(FORBIDDEN)]
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_megatron_is_a_namespace_package():
    repo = ROOT.parents[1]
    assert not (repo / "megatron" / "__init__.py").exists()
    import megatron.core
    import megatron.sft

    assert Path(megatron.sft.__file__).parent == ROOT
    assert "site-packages" in megatron.core.__file__ or "dist-packages" in megatron.core.__file__
