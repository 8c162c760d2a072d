"""Registry of supported HF architectures: ``config.json["architectures"][0]`` -> table.

Adding an architecture means adding one module here that defines an :class:`ArchitectureSpec`
and listing it in ``_TABLES``; the converter, exporter and model builder never change.
"""

from __future__ import annotations

from typing import Any

from megatron.sft.bridge.architectures.base import ArchitectureSpec
from megatron.sft.bridge.architectures.llama import LLAMA
from megatron.sft.bridge.architectures.mistral import MISTRAL
from megatron.sft.bridge.architectures.qwen2 import QWEN2
from megatron.sft.bridge.architectures.qwen3 import QWEN3
from megatron.sft.bridge.model_shape import ModelShape, UnsupportedModelError

_TABLES: dict[str, ArchitectureSpec] = {
    spec.hf_architecture: spec for spec in (LLAMA, QWEN2, QWEN3, MISTRAL)
}


def supported_architectures() -> list[str]:
    return sorted(_TABLES)


def get_architecture(name: str) -> ArchitectureSpec:
    try:
        return _TABLES[name]
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
