"""Multi-latent attention (DeepSeek-V2/V3, Kimi-K2, Moonlight) on our packed-row backends.

megatron-core 0.16.1's ``MLASelfAttention`` does the latent projections, the norms and the
(YaRN) RoPE, then calls its core attention with ``k_channels = qk_nope + qk_rope`` (192 for
DeepSeek-V3) and ``v_channels = v_head_dim`` (128). Its local spec's ``DotProductAttention``
does not take those keywords (``TypeError``, Megatron-LM #1589) and asserts CP == 1 and no
packed rows, so on the local spec MLA could not be built at all. This module gives it:

- :class:`MLACoreAttention`: :class:`~megatron.sft.model.attention.core.PackedCoreAttention`
  (every registered packed kernel: ``sdpa``, ``varlen``, ``flex``, and their all-gather CP
  kernels) for q/k of head dim ``dk`` and v of head dim ``dv < dk``. V is zero-padded to
  ``dk`` and the output cut back to ``dv``: ``softmax(qk^T) [v | 0] = [softmax(qk^T) v | 0]``,
  so it is exact, and every kernel (flash kernels want one head dim) runs unchanged. The cost
  is ``dk / dv`` (1.5x for DeepSeek-V3) of the P·V half of the attention FLOPs and of V's
  all-gather under CP. The softmax scale is MLA's own (``mscale² / sqrt(dk)`` with YaRN's
  ``mscale_all_dim``), handed over by megatron-core as ``softmax_scale``.
- :class:`PackedMLASelfAttention`: ``MLASelfAttention`` that computes q/k/v as for an
  unpacked ``[s, b]`` batch (plain RoPE over the row, cut for this CP rank the way our CP
  split expects; RoPE is relative, so rows whose positions do not restart per document give
  the same attention once documents are isolated), and passes our ``DocumentSegments`` to
  the core attention only. megatron-core reads a non-``None`` ``packed_seq_params`` as THD
  (``[t, h, d]``, squeezing the batch dimension), which our ``sbhd`` segments are not.
- :func:`mla_self_attention_spec`: the layer's ``self_attention`` spec, megatron-core's local
  linears with our sequence-parallel-aware norms. The down projections
  (``linear_q_down_proj``, ``linear_kv_down_proj``) are column-parallel as in megatron-core's
  local spec: their output rows are split over TP in checkpoints and gathered in the layer.

Transformer Engine layers keep this same attention (megatron-core's TE MLA spec fuses
``q_layernorm`` into ``linear_q_up_proj`` and replicates the down projections, which would
give a second checkpoint layout); :func:`check_mla_layers` says so when asked for TE.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F

from megatron.sft.model.attention.core import PackedCoreAttention


class MLACoreAttention(PackedCoreAttention):
    """``PackedCoreAttention`` for ``query``/``key`` ``[s, b, h, dk]`` and ``value``
    ``[s, b, h, dv]`` (``dv <= dk``), returning ``[s, b, h * dv]``.

    >>> import torch
    >>> v = torch.ones(3, 1, 2, 4)
    >>> MLACoreAttention.pad_value(v, 6).shape, MLACoreAttention.pad_value(v, 6)[0, 0, 0]
    (torch.Size([3, 1, 2, 6]), tensor([1., 1., 1., 1., 0., 0.]))
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 k_channels: Optional[int] = None, v_channels: Optional[int] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, *, backend: str,
                 window: Optional[int] = None):
        # megatron-core's Attention base builds a core attention first (no MLA keywords), then
        # MultiLatentAttention replaces it with one given MLA's scale and head dims.
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection,
                         backend=backend, window=window)
        self.k_channels = k_channels
        self.v_channels = v_channels

    @staticmethod
    def pad_value(value: torch.Tensor, dk: int) -> torch.Tensor:
        """``value [..., dv]`` -> ``[..., dk]`` with zeros in the last ``dk - dv`` columns."""
        dv = value.shape[-1]
        if dv > dk:
            raise ValueError(f"multi-latent attention: v head dim {dv} > q/k head dim {dk}")
        return value if dv == dk else F.pad(value, (0, dk - dv))

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        s, b, h, dk = query.shape
        dv = value.shape[-1]
        out = super().forward(query, key, self.pad_value(value, dk), attention_mask,
                              attn_mask_type, attention_bias, packed_seq_params)
        if dv == dk:
            return out
        return out.view(out.shape[0], b, h, dk)[..., :dv].reshape(out.shape[0], b, h * dv)


def mla_attention(kernel, q, k, v, segments, scale: float, window: Optional[int] = None
                  ) -> torch.Tensor:
    """A registered packed ``kernel`` on MLA's head dims: ``q``/``k`` ``[t, h, dk]``, ``v``
    ``[t, h, dv]`` -> ``[t, h, dv]`` (V zero-padded to ``dk``, the output cut back; what
    :class:`MLACoreAttention` does inside ``PackedCoreAttention``). The kernels' tests use it."""
    dv = v.shape[-1]
    return kernel(q, k, MLACoreAttention.pad_value(v, q.shape[-1]), segments, scale,
                  window)[..., :dv]


@functools.lru_cache(maxsize=None)
def mla_core_attention_class(backend: str, window: Optional[int] = None) -> type:
    """:class:`MLACoreAttention` bound to ``backend`` and ``window`` as a class: the Attention
    base calls its core attention directly and ``MultiLatentAttention`` builds it with
    ``build_module``, which takes a class or a ``ModuleSpec`` but not a ``functools.partial``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("backend", backend)
        kwargs.setdefault("window", window)
        MLACoreAttention.__init__(self, *args, **kwargs)

    name = f"MLACoreAttention_{backend}" + (f"_w{window}" if window else "")
    return type(name, (MLACoreAttention,), {"__init__": __init__, "__module__": __name__})


@functools.lru_cache(maxsize=None)
def _packed_mla_class() -> type:
    """Made on first use: importing megatron-core costs seconds and ``--help`` must not."""
    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    if not isinstance(mla.TELinear, type):
        # Without Transformer Engine megatron-core 0.16.1 leaves ``TELinear = None`` but may
        # still set ``HAVE_TE``, and ``MultiLatentAttention.__init__`` then calls
        # ``isinstance(self.linear_proj, TELinear)``: a type nothing is an instance of.
        mla.TELinear = type("NoTransformerEngineLinear", (), {})

    class PackedMLASelfAttention(MLASelfAttention):
        """``MLASelfAttention`` whose q/k/v are computed as for unpacked ``[s, b]`` rows; the
        document segments (``packed_seq_params``) reach the core attention only."""

        def get_query_key_value_tensors(self, hidden_states, key_value_states=None,
                                        position_ids=None, packed_seq_params=None,
                                        inference_context=None, *, inference_params=None):
            return super().get_query_key_value_tensors(
                hidden_states, key_value_states, position_ids, None,
                inference_context=inference_context, inference_params=inference_params)

    PackedMLASelfAttention.__qualname__ = "PackedMLASelfAttention"
    return PackedMLASelfAttention


def __getattr__(name: str) -> Any:
    if name == "PackedMLASelfAttention":
        return _packed_mla_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mla_self_attention_spec(backend, window: Optional[int] = None):
    """The ``self_attention`` ``ModuleSpec`` of an MLA layer on ``backend`` (a registered
    :class:`~megatron.sft.model.attention.AttentionBackendSpec` with a packed kernel)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron.sft.model.norms import LocalNorm

    if backend.kernel is None:
        raise ValueError(f"--attention-backend {backend.name}: multi-latent attention runs on "
                         "the packed backends (sdpa, varlen, flex); use one of them")
    core = mla_core_attention_class(backend.name, window)
    return ModuleSpec(
        module=_packed_mla_class(), params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear, linear_q_down_proj=ColumnParallelLinear,
            linear_q_up_proj=ColumnParallelLinear, linear_kv_down_proj=ColumnParallelLinear,
            linear_kv_up_proj=ColumnParallelLinear, core_attention=core,
            linear_proj=RowParallelLinear,
            # After the down projections the sequence is split again under SP, so these are
            # layer norms (gradients summed over TP), not per-head norms.
            q_layernorm=LocalNorm, kv_layernorm=LocalNorm))


def use_mla(spec, backend, window: Optional[int] = None) -> None:
    """Turn a local GPT layer ``spec`` into an MLA layer in place: our MLA self-attention and
    a separate input norm (nothing fuses it into a linear)."""
    from megatron.sft.model.norms import LocalNorm

    spec.submodules.self_attention = mla_self_attention_spec(backend, window)
    spec.submodules.input_layernorm = LocalNorm


def check_mla_layers(linear: str) -> Optional[str]:
    """Why MLA cannot run with these layer modules, or ``None``."""
    if linear == "te":
        return ("multi-latent attention (DeepSeek-V2/V3) runs on megatron-core's local layer "
                "spec with our packed attention backends; use --transformer-impl local")
    return None
