"""Registry of supported HF architectures: ``config.json["architectures"][0]`` -> spec.

Each module in this package defines one :class:`ArchitectureSpec` and passes it to
:func:`register` at module level. Importing this package imports every such module (all but
``base`` and ``_``-prefixed helpers), so a new file is registered by existing; there is no list
to forget. The how-to for adding one is :class:`ArchitectureSpec`'s docstring.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from megatron.sft.bridge.architectures.base import (
    ArchitectureSpec,
    MegatronSettings,
    defining_modules,
    register,
    registered_specs,
)
from megatron.sft.bridge.model_shape import ModelShape, UnsupportedModelError

#: Modules here that are not architectures.
_NOT_ARCHITECTURES = frozenset({"base"})


def architecture_modules() -> list[str]:
    """Full names of the modules that must each register one architecture."""
    return [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__)
            if m.name not in _NOT_ARCHITECTURES and not m.name.startswith("_")]


for _module in architecture_modules():
    importlib.import_module(_module)


#: architectures known and refused, with why (before anything is read or written)
REFUSED = {
    "DeepseekV32ForCausalLM": "DeepSeek-V3.2's sparse attention (the DSA lightning indexer and "
                              "its top-k key selection) is not supported; DeepSeek-V3/V3.1/R1 "
                              "(DeepseekV3ForCausalLM) are",
}


def supported_architectures() -> list[str]:
    return list(registered_specs())


def get_architecture(name: str) -> ArchitectureSpec:
    if name in REFUSED:
        raise UnsupportedModelError(f"architecture {name!r}: {REFUSED[name]}")
    try:
        return registered_specs()[name]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {name!r} is not supported; supported: "
            f"{', '.join(supported_architectures())}"
        ) from None


def architecture_of(hf_config: dict[str, Any]) -> ArchitectureSpec:
    archs = hf_config.get("architectures") or []
    if not archs:
        raise UnsupportedModelError(
            "config.json has no 'architectures' entry; supported: "
            + ", ".join(supported_architectures())
        )
    return get_architecture(archs[0])


def shape_of(hf_config: dict[str, Any]) -> tuple[ArchitectureSpec, ModelShape]:
    spec = architecture_of(hf_config)
    return spec, spec.shape(hf_config)


__all__ = ["ArchitectureSpec", "MegatronSettings", "architecture_modules", "architecture_of", "defining_modules",
           "get_architecture", "register", "registered_specs", "shape_of",
           "supported_architectures"]
