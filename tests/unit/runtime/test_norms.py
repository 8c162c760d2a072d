"""Our local-spec norms: torch's RMSNorm / LayerNorm (same names and numbers), with the weights
marked for megatron-core's sequence-parallel gradient all-reduce; the local layer spec uses them
everywhere megatron-core would build WrappedTorchNorm (which refuses sequence parallelism)."""

import types

import pytest
import torch

from megatron.sft.model.layer_impl import LayerImpl
from megatron.sft.model.norms import LocalHeadNorm, LocalNorm


def _config(normalization="RMSNorm", sequence_parallel=True, **kw):
    return types.SimpleNamespace(normalization=normalization, sequence_parallel=sequence_parallel,
                                 layernorm_zero_centered_gamma=False, **kw)


@pytest.mark.parametrize("normalization, cls", [("RMSNorm", torch.nn.RMSNorm),
                                                ("LayerNorm", torch.nn.LayerNorm)])
def test_local_norms_are_torch_norms_marked_for_sequence_parallelism(normalization, cls):
    for sp in (True, False):
        norm = LocalNorm(_config(normalization, sp), 8, eps=1e-6)
        assert type(norm) is cls and norm.eps == 1e-6
        assert all(p.sequence_parallel is sp for p in norm.parameters())
        x = torch.randn(3, 8)
        assert torch.equal(norm(x), cls(8, eps=1e-6)(x))  # same math as torch's (ones weight)
    head = LocalHeadNorm(_config(normalization), 8)
    assert not any(hasattr(p, "sequence_parallel") for p in head.parameters())
    centred = types.SimpleNamespace(normalization="RMSNorm", sequence_parallel=True,
                                    layernorm_zero_centered_gamma=True)
    with pytest.raises(ValueError, match="zero-centred norm weights need Transformer Engine"):
        LocalNorm(centred, 8)


def test_the_local_layer_spec_uses_them():
    spec = LayerImpl("local", "sdpa").layer_spec(qk_layernorm=True)
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    assert layer.input_layernorm is LocalNorm and layer.pre_mlp_layernorm is LocalNorm
    assert attention.q_layernorm is LocalHeadNorm and attention.k_layernorm is LocalHeadNorm
