"""Fixes for megatron-core 0.16.1 bugs that hit every machine without Transformer Engine, GPU
included (the CPU-only adaptations are in :mod:`megatron.sft.runtime.cpu_mode`).

We pin megatron-core and never patch site-packages; each fix here is the smallest change that
restores megatron-core's own intended behaviour, is idempotent, and has a test
(``tests/unit/runtime/test_mcore_compat.py``).

- **The MoE router without Transformer Engine.** ``moe_utils.py`` imports ``te_general_gemm``
  inside ``try: import transformer_engine ... except ImportError: HAVE_TE = False`` and never
  binds the name in the ``except`` branch, while ``RouterGatingLinearFunction`` tests
  ``if te_general_gemm is not None`` on every forward and backward: without TE every MoE
  forward raises ``NameError: name 'te_general_gemm' is not defined``. Binding it to ``None``
  selects the ``torch.mm`` path that the code already has for exactly this case.
- **The expert-bias token count with a padding mask** (DeepSeek-V3's router,
  ``moe_router_enable_expert_bias``). ``TopKRouter.routing`` flattens ``padding_mask`` to
  ``[tokens]`` and ``_apply_expert_bias`` then computes ``routing_map & ~padding_mask`` with
  ``routing_map [tokens, experts]``: a broadcast error (or, when tokens == experts, the wrong
  axis). The count is meant per token, so the mask gets its expert axis: ``[tokens, 1]``.
"""

from __future__ import annotations


def fix_moe_router_without_te() -> bool:
    """Bind ``moe_utils.te_general_gemm = None`` when Transformer Engine did not provide it.
    Returns whether the fix was needed (``False`` with TE, or when already applied)."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True


def fix_expert_bias_padding_mask() -> bool:
    """``TopKRouter._apply_expert_bias`` counting real tokens per expert with a ``[tokens]``
    padding mask (see the module docstring). Returns whether it was installed now."""
    import torch
    from megatron.core.transformer.moe.router import TopKRouter

    if getattr(TopKRouter._apply_expert_bias, "_sft_fixed", False):
        return False

    def _apply_expert_bias(self, routing_map, padding_mask=None):
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                if padding_mask is not None:
                    routing_map = routing_map & ~padding_mask.reshape(-1, 1)
                self.local_tokens_per_expert += routing_map.sum(dim=0)

    _apply_expert_bias._sft_fixed = True
    TopKRouter._apply_expert_bias = _apply_expert_bias
    return True


def apply_megatron_core_fixes() -> None:
    """Every fix of this module; called once the process group starts
    (``runtime.distributed.initialize_distributed``) and by tests that build models alone."""
    fix_moe_router_without_te()
    fix_expert_bias_padding_mask()
