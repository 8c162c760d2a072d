"""GptOssForCausalLM (gpt-oss-20b, gpt-oss-120b): GQA attention with q/k/v/o biases, learnable
attention sinks and windowed layers alternating with full ones (``layer_types``), YaRN RoPE,
and on every layer a softmax top-k router *with a bias* over experts that have biases and a
clamped SwiGLU.

What maps where (megatron-core names; the model side is ``model.attention.sinks``,
``model.yarn``, and the expert biases of ``model.moe``):

- ``self_attn.sinks [heads]`` -> ``core_attention.softmax_offset`` (``softmax_type="learnable"``),
  split over TP ranks by heads.
- ``layer_types`` -> ``window_size = (sliding_window - 1, 0)`` with ``window_attn_skip_freq``
  the per-layer list (1 = windowed).
- The experts are stored fused only, transposed: ``gate_up_proj [E, hidden, 2F]`` whose columns
  interleave gate and up (``gate = [..., ::2]``, ``up = [..., 1::2]``), ``gate_up_proj_bias
  [E, 2F]`` (interleaved alike), ``down_proj [E, F, hidden]``, ``down_proj_bias [E, hidden]``.
  Each expert's block is one contiguous range, read as the per-expert names ``mlp.experts.{e}.*``
  (``bridge.expert_layout``), and export fuses them back (``export_fused_experts``).
- The activation, from transformers' ``GptOssExperts._apply_gate``: ``gate.clamp(max=limit)``,
  ``up.clamp(-limit, limit)``, ``(up + 1) * gate * sigmoid(alpha * gate)``: megatron-core's
  ``quick_gelu`` (alpha 1.702 fixed) with ``activation_func_clamp_value = limit`` and
  ``glu_linear_offset = 1`` (``tests/unit/bridge/test_gpt_oss.py`` checks it against
  transformers' code, and refuses another alpha).
- The router: ``router.weight`` and ``router.bias`` (megatron-core's router bias comes with
  ``add_bias_linear``); top-k on the logits, softmax over the k (``moe_router_pre_softmax``
  false).

Not supported, refused: a ``swiglu_alpha`` other than 1.702; ``layer_types`` other than
sliding/full; running at expert TP > 1 (megatron-core 0.16.1 runs expert biases at expert TP 1
only; TP > 1 for attention runs over whole experts, ``--expert-tensor-parallel-size 1``,
proven against transformers at TP2 x EP2 in tests/integration/moe).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megatron.sft.bridge import transforms as T
from megatron.sft.bridge.architectures._moe import MoEConfigKeys, moe_settings
from megatron.sft.bridge.architectures.base import ArchitectureSpec, MegatronSettings, register
from megatron.sft.bridge.architectures.llama import DENSE_DECODER_RULES
from megatron.sft.bridge.expert_layout import FusedExpertLayout, FusedExperts
from megatron.sft.bridge.model_shape import ModelShape, UnsupportedModelError
from megatron.sft.bridge.rules import Replicated, TensorParallel, WeightRule

_L = "decoder.layers.{i}."
_H = "model.layers.{i}."
_E = _H + "mlp.experts."
_X = _E + "{e}."  # one expert's block of the fused tensors
_M = _L + "mlp.experts.local_experts.{e}."
QUICK_GELU_ALPHA = 1.702  # megatron-core's quick_gelu: x * sigmoid(1.702 x)


def deinterleave(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[hidden, 2F]`` (or ``[2F]``) with gate and up columns interleaved -> ``gate, up`` as
    ``[F, hidden]`` (``[F]``) rows.

    >>> [x.tolist() for x in deinterleave(torch.tensor([10, 20, 11, 21]))]
    [[10, 11], [20, 21]]
    """
    rows = t.transpose(0, 1) if t.dim() == 2 else t
    return rows[0::2].contiguous(), rows[1::2].contiguous()


def interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`deinterleave`."""
    rows = torch.empty((2 * gate.shape[0],) + tuple(gate.shape[1:]), dtype=gate.dtype)
    rows[0::2], rows[1::2] = gate, up
    return rows.transpose(0, 1).contiguous() if rows.dim() == 2 else rows


@dataclasses.dataclass(frozen=True)
class InterleavedGateUp(WeightRule):
    """One expert's ``gate_up_proj [hidden, 2F]`` (or its bias ``[2F]``), interleaved ->
    megatron-core's gated ``linear_fc1`` (``[gate; up]`` per TP rank)."""

    #: ``rank_shard`` reads the expert's whole block (it gathers rows or columns, not both)
    reads_whole = True

    def to_megatron(self, hf, ctx):
        gate, up = deinterleave(hf[0])
        return T.fuse_gate_up(gate, up, ctx.tp_size)

    def to_hf(self, shards, ctx):
        return (interleave(*T.unfuse_gate_up(shards)),)


@dataclasses.dataclass(frozen=True)
class TransposedRowParallel(WeightRule):
    """One expert's ``down_proj [F, hidden]`` -> ``linear_fc2 [hidden, F]``, split by columns."""

    reads_whole = True

    def to_megatron(self, hf, ctx):
        return T.split_tp(hf[0].transpose(0, 1).contiguous(), ctx.tp_size, 1)

    def to_hf(self, shards, ctx):
        return (T.merge_tp(shards, 1).transpose(0, 1).contiguous(),)


def _rules() -> tuple[WeightRule, ...]:
    attention = tuple(r for r in DENSE_DECODER_RULES if ".mlp." not in r.megatron)
    return attention + (
        Replicated(_L + "self_attention.linear_proj.bias", (_H + "self_attn.o_proj.bias",),
                   (("hidden",),)),
        TensorParallel(_L + "self_attention.core_attention.softmax_offset",
                       (_H + "self_attn.sinks",), (("heads",),), dim=0),
        Replicated(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",),
                   (("hidden",),)),
        Replicated(_L + "mlp.router.weight", (_H + "mlp.router.weight",),
                   (("experts", "hidden"),)),
        Replicated(_L + "mlp.router.bias", (_H + "mlp.router.bias",), (("experts",),)),
        InterleavedGateUp(_M + "linear_fc1.weight", (_X + "gate_up_proj",),
                          (("hidden", "expert_gate_up"),)),
        InterleavedGateUp(_M + "linear_fc1.bias", (_X + "gate_up_proj_bias",),
                          (("expert_gate_up",),)),
        TransposedRowParallel(_M + "linear_fc2.weight", (_X + "down_proj",),
                              (("expert_ffn", "hidden"),)),
        Replicated(_M + "linear_fc2.bias", (_X + "down_proj_bias",), (("hidden",),)),
    )


def _fused() -> FusedExpertLayout:
    names = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    return FusedExpertLayout(tuple(FusedExperts(_E + n, (_X + n,)) for n in names))


def gpt_oss_settings(hf_config: dict[str, Any], shape: ModelShape) -> MegatronSettings:
    """The MoE settings plus biases everywhere, sinks, the clamped SwiGLU (module docstring)."""
    from megatron.core.activations import quick_gelu

    alpha = float(hf_config.get("swiglu_alpha", QUICK_GELU_ALPHA))
    if alpha != QUICK_GELU_ALPHA:
        raise UnsupportedModelError(f"config.json swiglu_alpha={alpha} is not supported: "
                                    f"megatron-core's quick_gelu has alpha {QUICK_GELU_ALPHA}")
    types = set(hf_config.get("layer_types") or ())
    if types - {"sliding_attention", "full_attention"}:
        raise UnsupportedModelError(f"config.json layer_types {sorted(types)}: only "
                                    "sliding_attention and full_attention are supported")
    if not hf_config.get("attention_bias", True):
        raise UnsupportedModelError("config.json attention_bias=false is not supported for "
                                    "GptOssForCausalLM (o_proj's bias comes with the experts')")
    moe = moe_settings(hf_config, shape)
    transformer = dict(moe.transformer, add_bias_linear=True, softmax_type="learnable",
                       activation_func=quick_gelu, glu_linear_offset=1.0,
                       activation_func_clamp_value=float(hf_config.get("swiglu_limit", 7.0)))
    return MegatronSettings(transformer, dict(moe.layer_spec))


GPT_OSS = register(ArchitectureSpec(
    hf_architecture="GptOssForCausalLM",
    hf_config_class="GptOssConfig",
    rules=_rules(),
    fused_experts=_fused(),
    export_fused_experts=True,
    moe=MoEConfigKeys(num_experts="num_local_experts", ffn="intermediate_size",
                      renormalize=True, sparse_layers=False, linear_bias=True),
    configure=gpt_oss_settings,
    qkv_bias="attention_bias",
    # 4 experts top-2 on 4 layers (sliding, full, sliding, full; a window of 8 shorter than
    # the test rows), GQA, head_dim 16 != hidden / heads, YaRN, untied embeddings.
    tiny_config=dict(
        vocab_size=256, hidden_size=32, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False, router_aux_loss_coef=0.01,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 64},
    ),
))
