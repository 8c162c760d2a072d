"""What DeepSeek-V2 and DeepSeek-V3 share (not an architecture: no ``register`` here):
multi-latent attention, their experts block and how both map onto megatron-core.

HF -> Megatron names (``{i}`` layer; megatron-core's ``MLASelfAttention``, ``model.attention.mla``)::

    self_attn.q_a_proj            -> self_attention.linear_q_down_proj   (rows split over TP)
    self_attn.q_a_layernorm       -> self_attention.q_layernorm
    self_attn.q_b_proj            -> self_attention.linear_q_up_proj     (heads split over TP)
    self_attn.q_proj (no q_lora)  -> self_attention.linear_q_proj        (heads split over TP)
    self_attn.kv_a_proj_with_mqa  -> self_attention.linear_kv_down_proj  (rows split over TP)
    self_attn.kv_a_layernorm      -> self_attention.kv_layernorm
    self_attn.kv_b_proj           -> self_attention.linear_kv_up_proj    (heads split over TP)
    self_attn.o_proj              -> self_attention.linear_proj          (columns split over TP)
    input_layernorm               -> input_layernorm (its own module: there is no linear_qkv)

The down projections are column-parallel on megatron-core's local spec, which gathers their
output; so a checkpoint's rank file holds rows ``r/TP`` of them and ``q_lora_rank`` and
``kv_lora_rank + qk_rope_head_dim`` must divide by TP. RoPE: megatron-core's MLA rotates the
rope dims as interleaved pairs ``(x0, x1), (x2, x3)...`` (it de-interleaves before rotating), as
DeepSeek's release and transformers' ``rope_interleave=True`` (V3) and complex rotation (V2) do.

Routing, equal to transformers' routers (``tests/unit/bridge/test_deepseek_routing.py``):

- V3: ``sigmoid(logits)``; top-k chosen on ``sigmoid + e_score_correction_bias`` (the bias
  selects, it does not weigh) among the best ``topk_group`` of ``n_group`` groups (a group's
  score: its two best biased scores); weights = the chosen sigmoids, renormalised
  (``norm_topk_prob``), times ``routed_scaling_factor``. megatron-core: ``sigmoid`` score
  function, ``expert_bias``, ``moe_router_num_groups/group_topk`` (it scores a group by its
  top ``topk / group_topk`` experts, so that must be 2), ``moe_router_topk_scaling_factor``; its
  sigmoid router always renormalises, so ``norm_topk_prob=false`` is refused.
- V2: ``softmax`` over all experts, top-k (``greedy``; ``group_limited_greedy`` scores a group
  by its best expert: ``topk / topk_group`` must be 1), never renormalised, times
  ``routed_scaling_factor``: megatron-core's ``moe_router_pre_softmax``.
- Both: ``n_shared_experts`` always-on experts of ``moe_intermediate_size`` each = one shared
  MLP of ``n_shared_experts * moe_intermediate_size`` (megatron-core's shared expert, no gate);
  layers ``< first_k_dense_replace`` keep a dense MLP of ``intermediate_size``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from megatron.sft.bridge.architectures._moe import SharedExpert, expert_names, fused_layout, \
    moe_rules, moe_settings
from megatron.sft.bridge.architectures.base import MegatronSettings
from megatron.sft.bridge.architectures.llama import DENSE_DECODER_RULES
from megatron.sft.bridge.model_shape import MLAShape, ModelShape, MoEShape, \
    UnsupportedModelError, rope_parameters
from megatron.sft.bridge.rules import Replicated, TensorParallel

_L = "decoder.layers.{i}."
_A = _L + "self_attention."
_H = "model.layers.{i}."
_S = _H + "self_attn."
_N = (("hidden",),)

#: the dense decoder's rules without its q/k/v attention (and with the input norm as a module)
_DENSE_NO_ATTENTION = tuple(r for r in DENSE_DECODER_RULES
                            if ".self_attention." not in r.megatron)

MLA_RULES = (
    Replicated(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), _N),
    TensorParallel(_A + "linear_q_down_proj.weight", (_S + "q_a_proj.weight",),
                   (("q_lora", "hidden"),), dim=0, when="q_lora"),
    Replicated(_A + "q_layernorm.weight", (_S + "q_a_layernorm.weight",), (("q_lora",),),
               when="q_lora"),
    TensorParallel(_A + "linear_q_up_proj.weight", (_S + "q_b_proj.weight",),
                   (("q_heads", "q_lora"),), dim=0, when="q_lora"),
    TensorParallel(_A + "linear_q_proj.weight", (_S + "q_proj.weight",),
                   (("q_heads", "hidden"),), dim=0, when="no_q_lora"),
    TensorParallel(_A + "linear_kv_down_proj.weight", (_S + "kv_a_proj_with_mqa.weight",),
                   (("kv_a", "hidden"),), dim=0),
    Replicated(_A + "kv_layernorm.weight", (_S + "kv_a_layernorm.weight",), (("kv_lora",),)),
    TensorParallel(_A + "linear_kv_up_proj.weight", (_S + "kv_b_proj.weight",),
                   (("kv_b", "kv_lora"),), dim=0),
    TensorParallel(_A + "linear_proj.weight", (_S + "o_proj.weight",), (("hidden", "o_in"),),
                   dim=1),
)

_MLP = _H + "mlp."
_EXPERT = expert_names(_MLP)
_SHARED = SharedExpert(gate_proj=_MLP + "shared_experts.gate_proj.weight",
                       up_proj=_MLP + "shared_experts.up_proj.weight",
                       down_proj=_MLP + "shared_experts.down_proj.weight")

#: V2's weights; V3 adds the expert bias
DEEPSEEK_RULES = moe_rules(_DENSE_NO_ATTENTION + MLA_RULES, router=_MLP + "gate.weight",
                           shared=_SHARED, **_EXPERT)
EXPERT_BIAS_RULE = Replicated(_L + "mlp.router.expert_bias",
                              (_MLP + "gate.e_score_correction_bias",), (("experts",),),
                              when="moe_layer")


def _positive(cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if value is None or int(value) <= 0:
        raise UnsupportedModelError(f"config.json: {key}={value!r}, expected a positive integer")
    return int(value)


def read_mla(cfg: dict[str, Any], *, interleave_key: Optional[str]) -> MLAShape:
    """The MLA block of a DeepSeek config; refuses what megatron-core's MLA would compute
    differently, naming the key. ``interleave_key``: V3's ``rope_interleave`` (``None`` for V2,
    whose complex rotation is always interleaved)."""
    if cfg.get("attention_bias"):
        raise UnsupportedModelError("config.json: attention_bias=true: megatron-core's "
                                    "multi-latent attention has no projection biases")
    if interleave_key and cfg.get(interleave_key, True) is False:
        raise UnsupportedModelError(
            f"config.json: {interleave_key}=false (RoPE on split halves): megatron-core's "
            "multi-latent attention rotates interleaved pairs as DeepSeek's release does")
    q_lora = cfg.get("q_lora_rank")
    rope = rope_parameters(cfg)
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    dims = dict(q_lora_rank=int(q_lora) if q_lora else None,
                kv_lora_rank=_positive(cfg, "kv_lora_rank"),
                qk_nope_head_dim=_positive(cfg, "qk_nope_head_dim"),
                qk_rope_head_dim=_positive(cfg, "qk_rope_head_dim"),
                v_head_dim=_positive(cfg, "v_head_dim"),
                mtp_layers=int(cfg.get("num_nextn_predict_layers") or 0))
    if dims["v_head_dim"] > dims["qk_nope_head_dim"] + dims["qk_rope_head_dim"]:
        raise UnsupportedModelError("config.json: v_head_dim > qk_nope_head_dim + "
                                    "qk_rope_head_dim is not supported")
    if kind == "default":
        return MLAShape(**dims)
    if kind != "yarn":
        raise UnsupportedModelError(f"config.json: rope_type {kind!r} with multi-latent "
                                    "attention is not supported (supported: default, yarn)")
    if rope.get("attention_factor") is not None or rope.get("truncate", True) is False:
        raise UnsupportedModelError("config.json: yarn with attention_factor or truncate=false "
                                    "is not supported (megatron-core's YaRN derives the factor "
                                    "from mscale/mscale_all_dim and truncates)")
    mscale, all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    factor = float(rope["factor"])
    return MLAShape(
        **dims, rope_type="yarn", yarn_factor=factor,
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
        # transformers divides the two mscales only when both are set (and non-zero)
        mscale=float(mscale) if mscale and all_dim else None,
        mscale_all_dim=float(all_dim or 0.0))


def read_moe(cfg: dict[str, Any], *, sigmoid: bool) -> Optional[MoEShape]:
    """The experts block of a DeepSeek config (``sigmoid``: V3's router, else V2's)."""
    experts = int(cfg.get("n_routed_experts") or 0)
    if experts == 0:
        return None
    top_k = _positive(cfg, "num_experts_per_tok")
    layers = _positive(cfg, "num_hidden_layers")
    freq = int(cfg.get("moe_layer_freq") or 1)
    if freq != 1:
        raise UnsupportedModelError(f"config.json: moe_layer_freq={freq}: transformers' "
                                    "DeepSeek models make every layer from first_k_dense_replace "
                                    "on a MoE layer (moe_layer_freq 1)")
    dense = int(cfg.get("first_k_dense_replace") or 0)
    groups, group_topk = int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1)
    method = cfg.get("topk_method") or ("noaux_tc" if sigmoid else "greedy")
    if sigmoid:
        if (cfg.get("scoring_func") or "sigmoid") != "sigmoid" or method != "noaux_tc":
            raise UnsupportedModelError(
                f"config.json: scoring_func={cfg.get('scoring_func')!r}, topk_method={method!r}:"
                " DeepSeek-V3 routing is sigmoid with noaux_tc")
        if not cfg.get("norm_topk_prob", True) or top_k == 1:
            raise UnsupportedModelError(
                "config.json: norm_topk_prob=false (or top-1) with the sigmoid router: "
                "megatron-core's sigmoid router always renormalises the top-k weights")
        if groups > 1 and top_k // group_topk != 2:
            raise UnsupportedModelError(
                f"config.json: num_experts_per_tok={top_k} / topk_group={group_topk} != 2: "
                "transformers scores a group by its two best experts, megatron-core by its best "
                "num_experts_per_tok / topk_group")
    else:
        if method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(f"config.json: topk_method={method!r} is not supported "
                                        "(greedy, group_limited_greedy)")
        if method == "greedy":
            groups = group_topk = 1
        elif groups > 1 and top_k // group_topk != 1:
            raise UnsupportedModelError(
                f"config.json: group_limited_greedy with num_experts_per_tok={top_k} / "
                f"topk_group={group_topk} != 1: transformers scores a group by its best expert, "
                "megatron-core by its best num_experts_per_tok / topk_group")
    if groups > 1 and experts % groups:
        raise UnsupportedModelError(f"config.json: n_group={groups} does not divide "
                                    f"n_routed_experts={experts}")
    shared = int(cfg.get("n_shared_experts") or 0)
    ffn = _positive(cfg, "moe_intermediate_size")
    scale = float(cfg.get("routed_scaling_factor") or 1.0)
    return MoEShape(
        num_experts=experts, top_k=top_k, ffn_hidden_size=ffn,
        layers=tuple(range(dense, layers)),
        shared_expert_ffn_hidden_size=shared * ffn if shared else None,
        renormalize=sigmoid, aux_loss_coeff=float(cfg.get("router_aux_loss_coef") or 0.0),
        score_function="sigmoid" if sigmoid else "softmax", expert_bias=sigmoid,
        num_groups=groups if groups > 1 else None,
        group_topk=group_topk if groups > 1 else None,
        scaling_factor=scale if scale != 1.0 else None)


def deepseek_settings(hf_config: dict[str, Any], shape: ModelShape) -> MegatronSettings:
    """megatron-core's MLA config fields (``MLATransformerConfig``) and router settings."""
    base = moe_settings(hf_config, shape)
    m = shape.mla
    transformer = dict(base.transformer)
    transformer.update(
        multi_latent_attention=True, q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank,
        qk_head_dim=m.qk_nope_head_dim, qk_pos_emb_head_dim=m.qk_rope_head_dim,
        v_head_dim=m.v_head_dim, rope_type=m.rope_type, rotary_base=shape.rope.theta,
        rotary_scaling_factor=m.yarn_factor,
        original_max_position_embeddings=m.original_max_position_embeddings,
        beta_fast=m.beta_fast, beta_slow=m.beta_slow, mscale=m.mscale,
        mscale_all_dim=m.mscale_all_dim)
    moe = shape.moe
    if moe is not None:
        transformer.update(
            moe_router_score_function=moe.score_function,
            moe_router_pre_softmax=moe.score_function == "softmax" and not moe.renormalize,
            moe_router_enable_expert_bias=moe.expert_bias,
            moe_router_num_groups=moe.num_groups, moe_router_group_topk=moe.group_topk,
            moe_router_topk_scaling_factor=moe.scaling_factor)
    return MegatronSettings(transformer, {**base.layer_spec, "multi_latent_attention": True})


def softmax_scale(m: MLAShape) -> float:
    """MLA's softmax scale as transformers computes it (``yarn_apply_mscale``): the pair
    ``tests`` compare with megatron-core's ``MultiLatentAttention.softmax_scale``."""
    scale = m.qk_head_dim ** -0.5
    if m.rope_type == "yarn" and m.mscale_all_dim and m.yarn_factor > 1:
        mscale = 0.1 * m.mscale_all_dim * math.log(m.yarn_factor) + 1.0
        scale *= mscale * mscale
    return scale


FUSED_EXPERTS = fused_layout(gate_up_proj=_MLP + "experts.gate_up_proj",
                             down_proj=_MLP + "experts.down_proj", **_EXPERT)
