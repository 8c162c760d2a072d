"""What one architecture declares, and the registry that definitions add themselves to."""

from __future__ import annotations

import dataclasses
import fnmatch
import sys
from typing import Any, Callable, Mapping, Optional

from megatron.sft.bridge.expert_layout import FusedExpertLayout
from megatron.sft.bridge.model_shape import MoEShape, ModelShape, shape_from_hf_config
from megatron.sft.bridge.rules import WeightRule


@dataclasses.dataclass(frozen=True)
class MegatronSettings:
    """What one model needs set in megatron-core beyond the llama-shaped defaults, computed
    from its HF config by :meth:`ArchitectureSpec.megatron_settings`."""

    #: ``TransformerConfig`` field -> value (e.g. ``num_moe_experts``, ``moe_router_topk``)
    transformer: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: keyword arguments of megatron-core's GPT layer-spec builders
    #: (``get_gpt_layer_local_spec`` / ``get_gpt_layer_with_transformer_engine_spec``), e.g.
    #: ``num_experts``, ``moe_grouped_gemm``
    layer_spec: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
    """Everything the bridge, the tests and the model builder need to know about one HF
    architecture (``config.json["architectures"][0]``), in one place.

    How to add an architecture
    --------------------------
    1. **One file.** Create ``megatron/sft/bridge/architectures/<family>.py`` that defines the
       spec and registers it at module level::

           from megatron.sft.bridge.architectures.base import ArchitectureSpec, register
           from megatron.sft.bridge.architectures.llama import DENSE_DECODER_RULES

           MYMODEL = register(ArchitectureSpec(
               hf_architecture="MyModelForCausalLM",
               hf_config_class="MyModelConfig",
               rules=DENSE_DECODER_RULES,
               tiny_config=dict(vocab_size=250, hidden_size=64, intermediate_size=96,
                                num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, tie_word_embeddings=False),
           ))

       There is no list to update: the package ``__init__`` imports every module in this
       folder (except ``base`` and ``_private`` helpers), so defining the spec is registering it.
       Each module registers exactly one spec; a unit test enforces that.
    2. **Weights.** ``rules`` maps each Megatron tensor to its HF tensor(s) with ``{i}`` for the
       layer index. Reuse ``DENSE_DECODER_RULES`` for a llama-shaped decoder and append what
       differs (see ``qwen3.py``). For fused tensors use the named constructors
       ``qkv(name, q=…, k=…, v=…)`` and ``gate_up(name, gate=…, up=…)`` from ``rules``.
    3. **Shape quirks** are fields, not code: ``qkv_bias`` (a constant or the config key that
       holds it), ``qk_layernorm``, ``ignored_hf``. Anything ``ModelShape`` cannot express yet
       (a new config key, a new ``when=`` flag) goes into ``model_shape.py``.
    4. **megatron-core settings.** The model builder starts from llama-shaped
       ``TransformerConfig`` defaults (RMSNorm, SwiGLU, no linear bias) and applies
       ``transformer_overrides`` on top, e.g.
       ``transformer_overrides={"normalization": "LayerNorm", "gated_linear_unit": False}``.
       Settings that depend on the checkpoint (how many experts, top-k, ...) come from
       ``configure(hf_config, shape) -> MegatronSettings``, which may also pass arguments to
       the layer-spec builders. Keys must be ``TransformerConfig`` fields and layer-spec
       parameters (checked by a unit test).
    4b. **Experts.** ``moe(hf_config) -> MoEShape | None`` reads the experts block from the
       config (``ModelShape.moe``); per-expert weight rules use ``{e}`` beside ``{i}``, and
       ``when="moe_layer"`` / ``"dense_layer"`` picks which layers a rule maps. The shared
       pieces are in ``_moe.py`` (``MoEConfigKeys``, ``moe_rules``, ``moe_settings``): a MoE
       family is its dense family's rules plus those (see ``qwen3_moe.py``). Rules name the
       experts as ``save_pretrained`` writes them (one tensor per expert); ``fused_experts``
       declares the fused 3-D form (``bridge.expert_layout``), which conversion also accepts.
    5. **Tests pick it up by themselves.** ``tests/sft_testing.ARCHITECTURES`` is
       ``supported_architectures()``, so the table-coverage test
       (``tests/unit/bridge/test_tables_vs_transformers.py``), the lossless TP2xPP2 round trip
       (``tests/integration/bridge/test_roundtrip.py``) and the logits parity test run on a
       random model built from ``tiny_config``. Make the tiny config exercise the quirks
       (GQA, untied embeddings, biases, an explicit ``head_dim``...).
    6. **Prove it:** ``pytest tests/unit/bridge tests/integration/bridge/test_hf_parity.py``;
       the parity test compares megatron-core logits with transformers' on every TP/PP/VPP
       layout (fp32, max abs diff <= 1e-4).
    """

    #: ``config.json["architectures"][0]`` and the transformers model class name,
    #: e.g. ``"Qwen2ForCausalLM"``
    hf_architecture: str
    #: the transformers config class name, e.g. ``"Qwen2Config"``; random test models are
    #: built with it
    hf_config_class: str
    #: HF <-> Megatron weight mapping (see ``rules``)
    rules: tuple[WeightRule, ...]
    #: keyword arguments of ``hf_config_class`` for a tiny random test model (seconds on CPU);
    #: treat as read-only
    tiny_config: Mapping[str, Any] = dataclasses.field(hash=False)
    #: constant, or the config.json key holding whether q/k/v projections have a bias
    qkv_bias: "bool | str" = False
    qk_layernorm: bool = False
    #: HF tensors that carry no weights (buffers older checkpoints saved); never an error.
    ignored_hf: tuple[str, ...] = ("*.rotary_emb.inv_freq",)
    #: megatron-core ``TransformerConfig`` field -> value, applied by the model builder on top
    #: of its llama-shaped defaults; empty for llama-shaped models. Treat as read-only.
    transformer_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict,
                                                                 hash=False)
    #: ``(hf_config, shape) -> MegatronSettings`` for settings computed from the checkpoint
    configure: Optional[Callable[[dict[str, Any], ModelShape], MegatronSettings]] = \
        dataclasses.field(default=None, hash=False)
    #: ``hf_config -> MoEShape | None``: the experts block, for Mixture-of-Experts families
    moe: Optional[Callable[[dict[str, Any]], Optional[MoEShape]]] = \
        dataclasses.field(default=None, hash=False)
    #: the fused form of the routed experts (``[E, rows, cols]`` tensors) that checkpoints may
    #: hold instead of the per-expert tensors the rules name
    fused_experts: Optional[FusedExpertLayout] = None
    #: export writes the routed experts in the ``fused_experts`` form: the HF class loads no
    #: other (GPT-OSS); otherwise one tensor per expert, as ``save_pretrained`` writes them
    export_fused_experts: bool = False
    #: ``hf_config -> MLAShape | None``: multi-latent attention (DeepSeek-V2/V3)
    mla: Optional[Callable[[dict[str, Any]], Any]] = dataclasses.field(default=None, hash=False)
    #: HF and Megatron name patterns kept in float32 whatever the run's dtype (DeepSeek-V3's
    #: expert bias: megatron-core's router holds it in fp32, bf16 would change the routing)
    keep_fp32: tuple[str, ...] = ()

    def shape(self, hf_config: dict[str, Any]) -> ModelShape:
        return shape_from_hf_config(
            hf_config,
            architecture=self.hf_architecture,
            qkv_bias=self.qkv_bias,
            qk_layernorm=self.qk_layernorm,
            moe=self.moe(hf_config) if self.moe is not None else None,
            mla=self.mla(hf_config) if self.mla is not None else None,
        )

    def keeps_fp32(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.keep_fp32)

    @staticmethod
    def is_mtp(name: str, shape: ModelShape) -> bool:
        """Whether HF tensor ``name`` belongs to a multi-token-prediction layer after the
        decoder (DeepSeek-V3's ``model.layers.61.*``): never converted, put back on export."""
        mtp = shape.mla.mtp_layers if shape.mla is not None else 0
        parts = name.split(".")
        return (mtp > 0 and len(parts) > 2 and parts[:2] == ["model", "layers"]
                and parts[2].isdigit()
                and shape.num_layers <= int(parts[2]) < shape.num_layers + mtp)

    def megatron_settings(self, hf_config: dict[str, Any]) -> MegatronSettings:
        """``transformer_overrides`` plus what ``configure`` computes for this checkpoint."""
        computed = (self.configure(hf_config, self.shape(hf_config)) if self.configure
                    else MegatronSettings())
        return MegatronSettings({**self.transformer_overrides, **computed.transformer},
                                dict(computed.layer_spec))

    def active_rules(self, shape: ModelShape) -> tuple[WeightRule, ...]:
        return tuple(r for r in self.rules if r.applies(shape))

    def is_ignored(self, hf_name: str) -> bool:
        return any(fnmatch.fnmatchcase(hf_name, pattern) for pattern in self.ignored_hf)


#: ``hf_architecture`` -> spec, filled by :func:`register` as architecture modules are imported.
_REGISTRY: dict[str, ArchitectureSpec] = {}
#: ``hf_architecture`` -> name of the module that registered it (for the completeness test).
_DEFINED_IN: dict[str, str] = {}


def register(spec: ArchitectureSpec) -> ArchitectureSpec:
    """Add ``spec`` to the registry and return it (so ``NAME = register(ArchitectureSpec(...))``).

    Call it at module level in the module that defines the spec: the registry records that
    module, and the completeness test checks every architecture module registers exactly one.
    Registering a name twice from different modules is an error (two tables for one model).
    """
    module = sys._getframe(1).f_globals.get("__name__", "?")
    owner = _DEFINED_IN.get(spec.hf_architecture)
    if owner is not None and owner != module:
        raise ValueError(
            f"architecture {spec.hf_architecture!r} is registered by both {owner} and {module}; "
            f"keep one of the two tables"
        )
    _REGISTRY[spec.hf_architecture] = spec
    _DEFINED_IN[spec.hf_architecture] = module
    return spec


def registered_specs() -> dict[str, ArchitectureSpec]:
    """``{hf_architecture: spec}`` sorted by name (a copy)."""
    return dict(sorted(_REGISTRY.items()))


def defining_modules() -> dict[str, str]:
    """``{hf_architecture: module name}`` of every :func:`register` call."""
    return dict(_DEFINED_IN)
