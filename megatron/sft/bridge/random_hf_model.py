"""Random-weight HuggingFace models made from a config, for tests, the offline demo and
benchmarks (nothing is downloaded).

``TINY_CONFIGS`` deliberately vary what the bridge must get right: GQA vs MHA, tied vs untied
embeddings, q/k/v biases, q/k norms, an explicit ``head_dim`` that differs from
``hidden/heads``, llama3 rope scaling, and vocabularies that need Megatron padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(
        vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    "Qwen2ForCausalLM": dict(
        vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0,
    ),
    "Qwen3ForCausalLM": dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, head_dim=24, max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=1000000.0,
    ),
    "MistralForCausalLM": dict(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=1024,
    ),
}

#: Roughly Qwen2-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV heads, tied, 151936 vocab).
QWEN2_0_5B_CONFIG: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
    rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0,
)


def _config_class(architecture: str):
    import transformers

    names = {
        "LlamaForCausalLM": "LlamaConfig",
        "Qwen2ForCausalLM": "Qwen2Config",
        "Qwen3ForCausalLM": "Qwen3Config",
        "MistralForCausalLM": "MistralConfig",
    }
    return getattr(transformers, names[architecture])


def make_random_hf_model(architecture: str, out_dir: "str | Path", *,
                         overrides: Optional[dict[str, Any]] = None,
                         dtype: torch.dtype = torch.float32, seed: int = 0,
                         config: Optional[dict[str, Any]] = None) -> Path:
    """Save a randomly initialised ``architecture`` model with safetensors weights.

    Norm weights are randomised too (HF initialises them to ones), so a converter that mixed
    up two norms would be caught by a logits comparison.
    """
    import transformers

    kwargs = dict(config if config is not None else TINY_CONFIGS[architecture])
    kwargs.update(overrides or {})
    cfg = _config_class(architecture)(architectures=[architecture], **kwargs)
    torch.manual_seed(seed)
    model_cls = getattr(transformers, architecture)
    model = model_cls(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    model = model.to(dtype)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return out
