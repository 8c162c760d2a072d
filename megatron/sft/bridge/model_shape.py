"""HF ``config.json`` -> the architecture-independent shape of a decoder (pure), dense or with
a Mixture-of-Experts block (:class:`MoEShape`).

Reads the raw JSON dict rather than a ``transformers`` config object so conversion works with
any ``transformers`` version: hub checkpoints carry ``rope_theta``/``rope_scaling`` while
``transformers`` 5 writes ``rope_parameters``; both spellings are accepted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional


class UnsupportedModelError(ValueError):
    """The HF model uses a feature megatron-core (or this bridge) cannot reproduce exactly."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float
    #: llama3-style frequency scaling (Llama 3.1/3.2); ``None`` for plain RoPE.
    llama3_factor: Optional[float] = None
    #: YaRN (GPT-OSS): ``model.yarn.YarnConfig`` keyword arguments, ``None`` without
    yarn: Optional[tuple[tuple[str, Any], ...]] = None


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """The Mixture-of-Experts part of a decoder: routed experts on the layers in ``layers``
    (the others keep the dense MLP of ``ModelShape.ffn_hidden_size``), and how tokens are
    routed to them.

    Routing is softmax top-k, as in Qwen2/3-MoE and Mixtral: ``p = softmax(router_logits)``
    over all experts, the ``top_k`` largest kept, and with ``renormalize`` divided by their sum
    (transformers' ``norm_topk_prob``; Mixtral always). megatron-core expresses the same as
    ``moe_router_pre_softmax = not renormalize``: softmax over the top-k *logits* equals the
    renormalised top-k probabilities (``tests/unit/bridge/test_moe_router_semantics.py``
    checks this against transformers' routers).
    """

    num_experts: int
    #: experts each token is routed to
    top_k: int
    #: intermediate size of one routed expert
    ffn_hidden_size: int
    #: global indices of the layers whose MLP is the MoE block
    layers: tuple[int, ...]
    #: intermediate size of the always-on shared expert(s), ``None`` without one
    shared_expert_ffn_hidden_size: Optional[int] = None
    #: the top-k probabilities are divided by their sum (``norm_topk_prob``)
    renormalize: bool = True
    #: the shared expert's output is scaled by ``sigmoid(x . shared_expert_gate)`` (Qwen2-MoE)
    shared_expert_gate: bool = False
    #: the HF config's ``router_aux_loss_coef``: the default of ``--moe-aux-loss-coeff``
    aux_loss_coeff: float = 0.0
    #: the experts' linears have biases (GPT-OSS); megatron-core runs them at ETP 1 only
    linear_bias: bool = False
    #: ``softmax`` (above) or ``sigmoid`` (DeepSeek-V3: ``sigmoid(logits)``, top-k chosen on
    #: ``sigmoid + expert_bias``, weighted by the sigmoid alone, renormalised)
    score_function: str = "softmax"
    #: a per-expert selection bias (DeepSeek-V3's ``e_score_correction_bias``)
    expert_bias: bool = False
    #: group-limited routing: experts in ``num_groups`` groups, top-k among the best
    #: ``group_topk`` groups (DeepSeek's ``n_group`` / ``topk_group``); ``None``: off
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    #: the routing weights are multiplied by this (``routed_scaling_factor``); ``None``: 1
    scaling_factor: Optional[float] = None

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.layers


@dataclasses.dataclass(frozen=True)
class MLAShape:
    """Multi-latent attention (DeepSeek-V2/V3): queries through a ``q_lora_rank`` latent (or
    one ``q_proj`` when ``None``), keys and values through a shared ``kv_lora_rank`` latent,
    head dims ``qk_nope + qk_rope`` for q/k and ``v_head_dim`` for v; RoPE on the
    ``qk_rope`` part only, plain or YaRN (``rope_type``)."""

    q_lora_rank: Optional[int]
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    #: ``rope`` or ``yarn`` (megatron-core's MLA names)
    rope_type: str = "rope"
    yarn_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    #: YaRN's cos/sin factor numerator (``None``: transformers' default ``0.1 ln(factor) + 1``)
    mscale: Optional[float] = None
    #: YaRN's ``mscale_all_dim``: the softmax scale is multiplied by
    #: ``(0.1 * mscale_all_dim * ln(factor) + 1)^2``; 0 = off
    mscale_all_dim: float = 0.0
    #: multi-token-prediction layers the checkpoint holds after the decoder
    #: (``num_nextn_predict_layers``): not converted, put back unchanged on export
    mtp_layers: int = 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Everything the bridge and the model builder need to know about a checkpoint's model."""

    architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    norm_epsilon: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool
    #: Mistral-style sliding-window attention width, ``None`` for full causal attention.
    sliding_window: Optional[int] = None
    #: per-layer windows (GPT-OSS's ``layer_types``: ``True`` = this layer has the window of
    #: ``layer_window``); empty when every layer is alike (``sliding_window`` says which)
    window_layers: tuple[bool, ...] = ()
    layer_window: Optional[int] = None
    #: the Mixture-of-Experts block, ``None`` for a dense model
    moe: Optional[MoEShape] = None
    #: multi-latent attention, ``None`` for q/k/v attention
    mla: Optional[MLAShape] = None

    def dim(self, symbol: str) -> int:
        """Sizes named in weight tables: ``hidden``, ``ffn``, ``vocab``, ``head_dim``, ``q``
        (all query heads), ``kv`` (all key or value heads); with experts also ``experts``,
        ``expert_ffn`` (one routed expert's intermediate size) and ``shared_ffn``. An int is a
        literal size (``(1, "hidden")`` for Qwen2-MoE's one-row shared-expert gate)."""
        if isinstance(symbol, int):
            return symbol
        sizes = {
            "hidden": self.hidden_size,
            "ffn": self.ffn_hidden_size,
            "vocab": self.vocab_size,
            "head_dim": self.head_dim,
            "q": self.num_attention_heads * self.head_dim,
            "kv": self.num_query_groups * self.head_dim,
            "heads": self.num_attention_heads,
        }
        if self.moe is not None:
            sizes.update(experts=self.moe.num_experts, expert_ffn=self.moe.ffn_hidden_size,
                         expert_gate_up=2 * self.moe.ffn_hidden_size,
                         shared_ffn=self.moe.shared_expert_ffn_hidden_size or 0)
        if self.mla is not None:  # DeepSeek's names: q_a/q_b, kv_a (with the rope key), kv_b
            m, heads = self.mla, self.num_attention_heads
            sizes.update(q_lora=m.q_lora_rank or 0, kv_lora=m.kv_lora_rank,
                         q_heads=heads * m.qk_head_dim,
                         kv_a=m.kv_lora_rank + m.qk_rope_head_dim,
                         kv_b=heads * (m.qk_nope_head_dim + m.v_head_dim),
                         o_in=heads * m.v_head_dim)
        try:
            return sizes[symbol]
        except KeyError:
            raise KeyError(f"table error: unknown dimension {symbol!r} for a "
                           f"{'MoE' if self.moe else 'dense'} model") from None

    #: conditions that depend on the layer (``when=`` of per-layer rules)
    LAYER_FLAGS = ("moe_layer", "dense_layer", "shared_expert_layer")

    def flag(self, name: str, layer: Optional[int] = None) -> bool:
        """Conditions used by weight tables (``when=...``). ``moe_layer`` / ``dense_layer`` /
        ``shared_expert_layer`` (a MoE layer with a shared expert) ask about global layer
        ``layer`` (a dense model's layers are all dense)."""
        if name in self.LAYER_FLAGS:
            if layer is None:
                raise ValueError(f"table error: when={name!r} needs a per-layer rule")
            moe = self.moe is not None and self.moe.is_moe_layer(layer)
            if name == "shared_expert_layer":
                return moe and self.flag("shared_expert")
            return moe if name == "moe_layer" else not moe
        conditions = {
            "qkv_bias": self.qkv_bias,
            "qk_layernorm": self.qk_layernorm,
            "untied": not self.tie_word_embeddings,
            "tied": self.tie_word_embeddings,
            "shared_expert": self.moe is not None
            and self.moe.shared_expert_ffn_hidden_size is not None,
            "q_lora": self.mla is not None and self.mla.q_lora_rank is not None,
            "no_q_lora": self.mla is not None and self.mla.q_lora_rank is None,
        }
        return conditions[name]


# Llama 3.1/3.2 rope scaling as implemented by megatron-core's RotaryEmbedding._apply_scaling:
# only the factor is a parameter there, the rest is fixed.
_MCORE_LLAMA3_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings in either spelling: transformers 5's ``rope_parameters`` or the hub's
    ``rope_scaling`` (+ ``rope_theta``)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    if not params and scaling:
        params = dict(scaling)
    return params


def _rope_from_config(cfg: dict[str, Any]) -> RopeConfig:
    params = rope_parameters(cfg)
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if rope_type == "llama3":
        for key, expected in _MCORE_LLAMA3_FIXED.items():
            if key in params and float(params[key]) != float(expected):
                raise UnsupportedModelError(
                    f"rope scaling 'llama3' with {key}={params[key]} is not supported: "
                    f"megatron-core implements it with {key}={expected} only"
                )
        return RopeConfig(theta=float(theta), llama3_factor=float(params["factor"]))
    if rope_type == "yarn":
        keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                "truncate", "attention_factor", "mscale", "mscale_all_dim")
        params.setdefault("original_max_position_embeddings",
                          cfg.get("original_max_position_embeddings"))
        missing = [k for k in keys[:2] if params.get(k) is None]
        if missing:
            raise UnsupportedModelError(f"rope_type 'yarn' without {', '.join(missing)} is not "
                                        "supported")
        yarn = tuple((k, params[k]) for k in keys if params.get(k) is not None)
        return RopeConfig(theta=float(theta), yarn=yarn)
    raise UnsupportedModelError(
        f"rope_type {rope_type!r} is not supported (supported: default, llama3, yarn)"
    )


def _require(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise UnsupportedModelError(f"config.json has no {key!r}")
    return cfg[key]


def shape_from_hf_config(
    cfg: dict[str, Any], *, architecture: str, qkv_bias: "bool | str", qk_layernorm: bool,
    moe: Optional[MoEShape] = None, mla: Optional[MLAShape] = None,
) -> ModelShape:
    """Build a :class:`ModelShape`; ``qkv_bias`` is a constant or the config key that holds it;
    ``moe`` is the experts block an architecture reads from its own config keys, ``mla`` its
    multi-latent attention (whose RoPE, YaRN included, it has read: ``rope`` keeps the base)."""
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only SwiGLU/silu)")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")
    heads = int(_require(cfg, "num_attention_heads"))
    hidden = int(_require(cfg, "hidden_size"))
    head_dim = (mla.v_head_dim if mla is not None else cfg.get("head_dim") or hidden // heads)
    bias = bool(cfg.get(qkv_bias, False)) if isinstance(qkv_bias, str) else bool(qkv_bias)
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:
        window = None
    types = cfg.get("layer_types") or ()
    window_layers: tuple[bool, ...] = ()
    if window and types and len(set(types)) > 1:  # windowed and full layers mixed
        window_layers = tuple(t == "sliding_attention" for t in types)
        layer_window, window = int(window), None
    else:
        layer_window = None
    return ModelShape(
        architecture=architecture,
        num_layers=int(_require(cfg, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(cfg, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        vocab_size=int(_require(cfg, "vocab_size")),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_config(cfg) if mla is None else RopeConfig(theta=float(
            rope_parameters(cfg).get("rope_theta", cfg.get("rope_theta", 10000.0)))),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bias,
        qk_layernorm=qk_layernorm,
        sliding_window=int(window) if window else None,
        window_layers=window_layers,
        layer_window=layer_window,
        moe=moe,
        mla=mla,
    )
