"""GPT-OSS's expert biases in ``GroupedMMExperts``: with ``add_bias_linear`` and the clamped
SwiGLU (quick_gelu, clamp 7, +1), its outputs equal megatron-core's ``SequentialMLP`` and, with
gradients (inputs, weights, biases), a per-token loop written here (fp32: grouped_mm has no
fp64), on one process."""

import pytest
import torch


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron.sft.runtime.mcore_compat import apply_megatron_core_fixes

    store = tmp_path_factory.mktemp("process_group") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    apply_megatron_core_fixes()
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _experts(cls, experts=3, hidden=16, ffn=8):
    from megatron.core.activations import quick_gelu
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, ffn_hidden_size=32, num_attention_heads=4,
        num_moe_experts=experts, moe_ffn_hidden_size=ffn, gated_linear_unit=True,
        activation_func=quick_gelu, glu_linear_offset=1.0, activation_func_clamp_value=7.0,
        add_bias_linear=True, use_cpu_initialization=True, params_dtype=torch.float32,
        bias_activation_fusion=False, gradient_accumulation_fusion=False)
    spec = get_moe_module_spec(use_te=False, num_experts=experts).submodules.experts
    torch.manual_seed(0)
    return cls(experts, config, spec.submodules, pg_collection=get_default_pg_collection())


def _by_hand(module, x, tokens, probs):
    rows, start = [], 0
    for e, n in enumerate(tokens.tolist()):
        fc1, fc2 = module.local_experts[e].linear_fc1, module.local_experts[e].linear_fc2
        w1, w2 = module.linear_fc1_weight[e], module.linear_fc2_weight[e]  # the 3-D parameters
        for t in range(start, start + n):
            h = x[t] @ w1.T + fc1.bias
            gate, up = h.chunk(2)
            gate, up = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
            a = gate * torch.sigmoid(1.702 * gate) * (up + 1) * probs[t]
            rows.append(a @ w2.T + fc2.bias * probs[t])
        start += n
    return torch.stack(rows)


def test_grouped_mm_adds_the_expert_biases(world_of_one):
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron.sft.model.moe.grouped_mm import GroupedMMExperts

    ref, fast = _experts(SequentialMLP), _experts(GroupedMMExperts)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 2)  # past the clamp
    fast.load_state_dict(ref.state_dict())
    assert any(n.endswith("linear_fc2.bias") for n, _ in fast.named_parameters())
    tokens = torch.tensor([2, 0, 3])
    x = torch.randn(5, 16, generator=gen, dtype=torch.float32)
    probs = torch.rand(5, generator=gen, dtype=torch.float32)
    with torch.no_grad():  # megatron-core's reference (its backward needs EP > 1, see builder)
        theirs, _ = ref(x, tokens, probs)
    xi = x.clone().requires_grad_()
    ours, _ = fast(xi, tokens, probs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    dy = torch.randn(ours.shape, generator=gen, dtype=torch.float32)
    params = [xi] + list(fast.parameters())
    got = torch.autograd.grad((ours * dy).sum(), params)
    want = torch.autograd.grad((_by_hand(fast, xi, tokens, probs) * dy).sum(), params,
                               allow_unused=True)
    for (name, _), g, w in zip([("x", None)] + list(fast.named_parameters()), got, want):
        w = torch.zeros_like(g) if w is None else w  # expert 1 received no token
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
