"""Random-weight HuggingFace models made from a config, for tests, the offline demo and
benchmarks (nothing is downloaded).

Each architecture's tiny config lives in its own module (``ArchitectureSpec.tiny_config``); they
deliberately vary what the bridge must get right: GQA vs MHA, tied vs untied embeddings, q/k/v
biases, q/k norms, an explicit ``head_dim`` that differs from ``hidden/heads``, llama3 rope
scaling, and vocabularies that need Megatron padding.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch

from megatron.sft.bridge.architectures import get_architecture, registered_specs


#: ``{hf_architecture: tiny config kwargs}`` for every registered architecture: copies, for
#: existing callers; each architecture's ``ArchitectureSpec.tiny_config`` is the source.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    name: copy.deepcopy(dict(spec.tiny_config)) for name, spec in registered_specs().items()
}

#: Roughly Qwen2-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV heads, tied, 151936 vocab).
QWEN2_0_5B_CONFIG: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
    rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0,
)


def _config_class(architecture: str):
    """The transformers config class the architecture's spec names (e.g. ``Qwen2Config``)."""
    import transformers

    return getattr(transformers, get_architecture(architecture).hf_config_class)


def make_random_hf_model(architecture: str, out_dir: "str | Path", *,
                         overrides: Optional[dict[str, Any]] = None,
                         dtype: torch.dtype = torch.float32, seed: int = 0,
                         config: Optional[dict[str, Any]] = None,
                         fused_experts: bool = False) -> Path:
    """Save a randomly initialised ``architecture`` model with safetensors weights.

    Norm weights are randomised too (HF initialises them to ones), so a converter that mixed
    up two norms would be caught by a logits comparison; MoE routers and shared-expert gates get
    10x HF's init scale, so routing is decisive and the gate far from its constant 0.5. ``save_pretrained`` writes routed
    experts one tensor per expert; ``fused_experts`` writes them as transformers holds them in
    memory instead (``mlp.experts.gate_up_proj [E, 2F, D]``...), the form of newer checkpoints.
    """
    import transformers

    # Deep copy: transformers may rewrite nested dicts (rope_scaling) it is given.
    kwargs = copy.deepcopy(dict(config if config is not None
                                else get_architecture(architecture).tiny_config))
    kwargs.update(overrides or {})
    cfg = _config_class(architecture)(architectures=[architecture], **kwargs)
    torch.manual_seed(seed)
    model_cls = getattr(transformers, architecture)
    model = model_cls(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith((".bias", "_bias", ".sinks")):  # GPT-OSS: expert biases, sinks
                param.normal_(0.0, 0.1 if not name.endswith(".sinks") else 1.0)
            elif name.endswith((".mlp.gate.weight", ".shared_expert_gate.weight",
                                ".mlp.router.weight")):
                param.normal_(0.0, 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith(".e_score_correction_bias"):  # DeepSeek-V3's selection bias
                buffer.normal_(0.0, 0.05)
    model = model.to(dtype)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    if fused_experts:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        for f in list(out.glob("model*.safetensors")) + list(out.glob("*.index.json")):
            f.unlink()
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
