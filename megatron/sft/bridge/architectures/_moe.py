"""What the Mixture-of-Experts families share (not an architecture: no ``register`` here).

- :class:`MoEConfigKeys`: which ``config.json`` keys hold the experts block, read into a
  ``MoEShape`` (``ArchitectureSpec.moe``), refusing the routing features megatron-core or this
  bridge would not reproduce exactly (:data:`UNSUPPORTED`), with the key, value and why.
- :func:`moe_rules`: a dense family's weight rules turned into the MoE family's: the dense MLP
  only on dense layers, the router, the routed experts (``{e}``) and an optional shared expert.
- :func:`fused_layout`: the fused ``[E, rows, cols]`` form of the same experts.
- :func:`moe_settings`: the megatron-core ``TransformerConfig`` fields and layer-spec arguments
  (``ArchitectureSpec.configure``).

Megatron names (checkpoint = Transformer Engine spec naming, as for dense layers): on a MoE
layer the pre-MLP norm is its own module (``pre_mlp_layernorm``; TE fuses it into
``linear_fc1`` only on dense MLPs), the experts are megatron-core's ``SequentialMLP``
(``mlp.experts.local_experts.{e}.linear_fc1/2``, ``{e}`` local to the expert-parallel rank),
the router ``mlp.router.weight`` and the shared expert ``mlp.shared_experts.*``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

from megatron.sft.bridge.architectures.base import MegatronSettings
from megatron.sft.bridge.expert_layout import FusedExpertLayout, FusedExperts
from megatron.sft.bridge.model_shape import ModelShape, MoEShape, UnsupportedModelError
from megatron.sft.bridge.rules import Replicated, TensorParallel, WeightRule, gate_up

_L = "decoder.layers.{i}."

#: ``(config key, accepted(value), what it is)``: routing features of other MoE families that a
#: config of these families may carry; any other value is refused before anything is written.
UNSUPPORTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("scoring_func", lambda v: v in (None, "softmax"),
     "a non-softmax router score (DeepSeek-V3's sigmoid router)"),
    ("topk_method", lambda v: v in (None, "greedy"),
     "a non-greedy top-k (DeepSeek's group-limited routing)"),
    ("n_group", lambda v: v in (None, 0, 1), "grouped, device-limited routing (DeepSeek)"),
    ("topk_group", lambda v: v in (None, 0, 1), "grouped, device-limited routing (DeepSeek)"),
    ("routed_scaling_factor", lambda v: v in (None, 1, 1.0), "scaled routing weights"),
    ("router_jitter_noise", lambda v: not v,
     "router jitter noise (transformers multiplies the experts' inputs too; megatron-core "
     "jitters the router's input only)"),
    ("moe_latent_size", lambda v: not v, "latent MoE projections"),
)


def check_supported_routing(cfg: dict[str, Any]) -> None:
    bad = [f"{key}={cfg[key]!r} ({what})" for key, ok, what in UNSUPPORTED
           if key in cfg and not ok(cfg[key])]
    if bad:
        raise UnsupportedModelError(
            "config.json asks for MoE routing that is not supported: " + "; ".join(bad)
            + ". Supported: softmax top-k routing, renormalised or not, with an optional "
              "sigmoid-gated shared expert (Qwen3-MoE, Qwen2-MoE, Mixtral)")


def _int(cfg: dict[str, Any], key: str) -> int:
    if cfg.get(key) is None:
        raise UnsupportedModelError(f"config.json has no {key!r}")
    return int(cfg[key])


@dataclasses.dataclass(frozen=True)
class MoEConfigKeys:
    """How one family spells its experts block in ``config.json``; calling it reads the
    ``MoEShape`` (``None`` when the config has no experts).

    Layers: every layer is a MoE layer unless ``sparse_layers`` and then as transformers'
    Qwen2/3-MoE decide: not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``.
    """

    #: the key(s) of the expert count, first present wins (hub configs of Qwen3-MoE say
    #: ``num_experts``, transformers 5 writes ``num_local_experts``)
    num_experts: Union[str, tuple[str, ...]]
    ffn: str
    #: a constant, or the key holding whether the top-k probabilities are renormalised
    renormalize: Union[bool, str]
    #: its value when the key is absent (transformers' config default)
    renormalize_default: bool = False
    shared_ffn: Optional[str] = None
    shared_expert_gate: bool = False
    sparse_layers: bool = True
    #: the experts' linears have biases (``MoEShape.linear_bias``)
    linear_bias: bool = False

    def __call__(self, cfg: dict[str, Any]) -> Optional[MoEShape]:
        keys = (self.num_experts,) if isinstance(self.num_experts, str) else self.num_experts
        experts = int(next((cfg[k] for k in keys if cfg.get(k) is not None), 0))
        if experts == 0:
            return None
        check_supported_routing(cfg)
        top_k = _int(cfg, "num_experts_per_tok")
        if not 0 < top_k <= experts:
            raise UnsupportedModelError(f"config.json: num_experts_per_tok={top_k} must be in "
                                        f"1..{keys[0]}={experts}")
        layers = _int(cfg, "num_hidden_layers")
        if self.sparse_layers:
            dense = set(cfg.get("mlp_only_layers") or ())
            step = int(cfg.get("decoder_sparse_step") or 1)
            moe_layers = tuple(i for i in range(layers)
                               if i not in dense and (i + 1) % step == 0)
        else:
            moe_layers = tuple(range(layers))
        renorm = self.renormalize if isinstance(self.renormalize, bool) else \
            bool(cfg.get(self.renormalize, self.renormalize_default))
        shared = int(cfg[self.shared_ffn]) if self.shared_ffn and cfg.get(self.shared_ffn) \
            else None
        return MoEShape(num_experts=experts, top_k=top_k, ffn_hidden_size=_int(cfg, self.ffn),
                        layers=moe_layers, shared_expert_ffn_hidden_size=shared,
                        renormalize=renorm, shared_expert_gate=shared is not None
                        and self.shared_expert_gate,
                        aux_loss_coeff=float(cfg.get("router_aux_loss_coef") or 0.0),
                        linear_bias=self.linear_bias)


@dataclasses.dataclass(frozen=True)
class SharedExpert:
    """HF names of an always-on shared expert (with ``{i}``); ``gate`` its sigmoid gate's
    ``[1, hidden]`` weight (Qwen2-MoE's ``shared_expert_gate``), ``None`` without one."""

    gate_proj: str
    up_proj: str
    down_proj: str
    gate: Optional[str] = None


def expert_names(block: str, gate: str = "gate_proj", up: str = "up_proj",
                 down: str = "down_proj") -> dict[str, str]:
    """The HF names of one routed expert's three projections (``{i}`` layer, ``{e}`` expert)
    under the MoE block ``block``, as :func:`moe_rules` and :func:`fused_layout` take them:
    Qwen's ``mlp.experts.{e}.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.{e}.w1``."""
    return dict(gate=f"{block}experts.{{e}}.{gate}.weight", up=f"{block}experts.{{e}}.{up}.weight",
                down=f"{block}experts.{{e}}.{down}.weight")


def moe_rules(dense_rules: tuple[WeightRule, ...], *, router: str, gate: str, up: str,
              down: str, shared: Optional[SharedExpert] = None) -> tuple[WeightRule, ...]:
    """The dense family's rules with the MLP only on dense layers, plus the MoE layers' pre-MLP
    norm (the same HF norm), router (``router``: ``[E, hidden]``), routed experts (``gate``,
    ``up``, ``down`` with ``{i}`` and ``{e}``) and ``shared`` expert."""
    mlp = _L + "mlp."
    norm = next(r for r in dense_rules if r.megatron == mlp + "linear_fc1.layer_norm_weight")
    rules = tuple(dataclasses.replace(r, when="dense_layer") if r.megatron.startswith(mlp)
                  else r for r in dense_rules)
    experts = mlp + "experts.local_experts.{e}."
    rules += (
        Replicated(_L + "pre_mlp_layernorm.weight", norm.hf, norm.dims, when="moe_layer"),
        Replicated(mlp + "router.weight", (router,), (("experts", "hidden"),),
                   when="moe_layer"),
        gate_up(experts + "linear_fc1.weight", gate=gate, up=up, when="moe_layer",
                ffn="expert_ffn"),
        TensorParallel(experts + "linear_fc2.weight", (down,), (("hidden", "expert_ffn"),),
                       dim=1, when="moe_layer"),
    )
    if shared is not None:
        s = mlp + "shared_experts."
        rules += (
            gate_up(s + "linear_fc1.weight", gate=shared.gate_proj, up=shared.up_proj,
                    when="shared_expert_layer", ffn="shared_ffn"),
            TensorParallel(s + "linear_fc2.weight", (shared.down_proj,),
                           (("hidden", "shared_ffn"),), dim=1, when="shared_expert_layer"),
        )
        if shared.gate is not None:
            rules += (Replicated(s + "gate_weight", (shared.gate,), ((1, "hidden"),),
                                 when="shared_expert_layer"),)
    return rules


def fused_layout(*, gate_up_proj: str, down_proj: str, gate: str, up: str, down: str,
                 renames: tuple[tuple[str, str], ...] = ()) -> FusedExpertLayout:
    """transformers 5's in-memory expert form: ``gate_up_proj [E, 2F, D]`` (gate rows first)
    and ``down_proj [E, D, F]``, for the per-expert ``gate``/``up``/``down`` names."""
    return FusedExpertLayout((FusedExperts(gate_up_proj, (gate, up)),
                              FusedExperts(down_proj, (down,))), renames)


def moe_settings(hf_config: dict[str, Any], shape: ModelShape) -> MegatronSettings:
    """megatron-core's names for the shape's experts block. ``moe_router_pre_softmax`` is
    ``not renormalize`` (see ``MoEShape``); the router runs in fp32 (``moe_router_dtype``) so
    routing does not flip on bf16 rounding; ``moe_aux_loss_coeff`` is the config's
    ``router_aux_loss_coef``, which ``--moe-aux-loss-coeff`` overrides."""
    moe = shape.moe
    if moe is None:
        return MegatronSettings()
    transformer = dict(
        num_moe_experts=moe.num_experts, moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_router_topk=moe.top_k, moe_router_pre_softmax=not moe.renormalize,
        moe_router_score_function="softmax", moe_router_load_balancing_type="aux_loss",
        moe_router_dtype="fp32", moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_layer_freq=[int(moe.is_moe_layer(i)) for i in range(shape.num_layers)],
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=moe.shared_expert_gate,
    )
    return MegatronSettings(transformer, {"num_experts": moe.num_experts})
