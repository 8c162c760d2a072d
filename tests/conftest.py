"""Shared fixtures: tiny random HF models for every supported architecture."""

from __future__ import annotations

import sys
import warnings
import zlib
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
    # Seeds derive from the name, not the list position: registering a new architecture must
    # not change the weights of the others' test models.
    return {arch: make_random_hf_model(arch, root / arch, seed=zlib.crc32(arch.encode()))
            for arch in ARCHITECTURES}


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


@pytest.fixture(scope="session")
def sft_assets(tmp_path_factory):
    """A ChatML tokenizer, a pre-tokenized arithmetic SFT dataset, and a tiny Qwen2 model whose
    vocabulary matches the tokenizer (HF dir + Megatron TP1PP1 checkpoint)."""
    from transformers import AutoTokenizer

    from megatron.sft.bridge.random_hf_model import make_random_hf_model
    from megatron.sft.data.preprocess import PreprocessConfig, preprocess
    from megatron.sft.data.tiny_tokenizer import save_tiny_tokenizer
    from sft_testing import write_arithmetic_conversations

    root = tmp_path_factory.mktemp("sft")
    tok_dir = save_tiny_tokenizer(root / "tokenizer", template="chatml")
    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    write_arithmetic_conversations(root / "chat.jsonl", 400, seed=0)
    preprocess(PreprocessConfig(input=str(root / "chat.jsonl"), tokenizer_model=str(tok_dir),
                                output_prefix=str(root / "ds"), progress=False))
    hf = make_random_hf_model("Qwen2ForCausalLM", root / "hf", seed=0,
                              overrides=dict(vocab_size=vocab))
    return {"root": root, "tokenizer": tok_dir, "data": str(root / "ds"), "hf": hf}
