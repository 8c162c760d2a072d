"""GPU: the ``grouped_mm`` experts equal megatron-core's ``SequentialMLP`` in bf16 on CUDA, on a
Qwen3-30B-A3B-sized expert block (hidden 2048, expert FFN 768, 16 local experts, uneven and
empty experts), forward and backward. Runs where CUDA is present.

Tolerance, stated: both sides compute bf16 matmuls with fp32 accumulation but in different
kernels (cuBLAS per expert vs the grouped GEMM), so elementwise results differ by bf16
rounding of differently ordered sums: we require the max abs difference of outputs, input
gradients and weight gradients to be <= 2e-2 x the reference's max abs value (bf16 has 8
mantissa bits: one ulp is 2^-8 = 3.9e-3 relative), and the mean abs difference <= 2e-3 x it.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron.sft.runtime.mcore_compat import apply_megatron_core_fixes

    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    ps.initialize_model_parallel(1, 1)
    apply_megatron_core_fixes()
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _experts(cls, experts=16, hidden=2048, ffn=768):
    import torch.nn.functional as F
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, ffn_hidden_size=4 * hidden, num_attention_heads=16,
        num_moe_experts=experts, moe_ffn_hidden_size=ffn, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, params_dtype=torch.bfloat16, bf16=True,
        bias_activation_fusion=False, gradient_accumulation_fusion=False)
    spec = get_moe_module_spec(use_te=False, num_experts=experts).submodules.experts
    return cls(experts, config, spec.submodules,
               pg_collection=get_default_pg_collection()).cuda()


def test_grouped_mm_equals_sequential_in_bf16(world_of_one):
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron.sft.model.moe.experts import grouped_mm_problem
    from megatron.sft.model.moe.grouped_mm import GroupedMMExperts

    problem = grouped_mm_problem("cuda", torch.bfloat16)
    assert problem is None, problem
    ref, fast = _experts(SequentialMLP), _experts(GroupedMMExperts)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device="cuda") * 0.02)
    fast.load_state_dict(ref.state_dict())
    counts = torch.randint(0, 600, (16,), generator=torch.Generator().manual_seed(1))
    counts[3] = 0  # an expert without tokens
    n = int(counts.sum())
    x = torch.randn(n, 2048, generator=gen, device="cuda", dtype=torch.bfloat16)
    probs = torch.rand(n, generator=gen, device="cuda")
    dy = torch.randn(n, 2048, generator=gen, device="cuda", dtype=torch.bfloat16)
    outs = []
    for module in (ref, fast):
        xi = x.clone().requires_grad_()
        out, _ = module(xi, counts, probs)
        out.backward(dy)
        outs.append([out, xi.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*outs):
        a, b = a.float(), b.float()
        scale = a.abs().max().clamp(min=1e-6)
        assert (a - b).abs().max() <= 2e-2 * scale
        assert (a - b).abs().mean() <= 2e-3 * scale
