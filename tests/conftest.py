"""Shared fixtures: tiny random HF models for every supported architecture."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
for p in (str(TESTS.parent), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from sft_testing import ARCHITECTURES  # noqa: E402

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory) -> dict[str, Path]:
    """One random fp32 model per architecture, made once per test session (per xdist worker)."""
    from megatron.sft.bridge.random_hf_model import make_random_hf_model

    root = tmp_path_factory.mktemp("hf")
    return {arch: make_random_hf_model(arch, root / arch, seed=i)
            for i, arch in enumerate(ARCHITECTURES)}


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory):
    """Tiny BPE tokenizers trained in-process, one per chat-template shape."""
    from megatron.sft.data.tiny_tokenizer import TEMPLATES, save_tiny_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    return {
        name: save_tiny_tokenizer(root / name, template=name, extra_tokens=["<short>"])
        for name in TEMPLATES
    }


@pytest.fixture(scope="session")
def tokenizers(tokenizer_dirs):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(path) for name, path in tokenizer_dirs.items()}
