"""``--moe-experts-impl grouped_mm`` is megatron-core's ``SequentialMLP`` with each projection
of its local experts as one 3-D parameter: the same initial weights, the same checkpoint names
and shapes (each loads the other's state dict), the same outputs and gradients (fp32 within
1e-6; on CPU they are bit-identical), on one process (a world of one, no other rank)."""

import pytest
import torch

from megatron.sft.model.moe.experts import (
    ExpertsImplError,
    grouped_mm_problem,
    resolve_experts_impl,
    te_expert_renames,
)


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


def _experts(cls, dtype, experts=4, hidden=32, ffn=16):
    import torch.nn.functional as F
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, ffn_hidden_size=64, num_attention_heads=4,
        num_moe_experts=experts, moe_ffn_hidden_size=ffn, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True,
        params_dtype=dtype, bias_activation_fusion=False, gradient_accumulation_fusion=False)
    spec = get_moe_module_spec(use_te=False, num_experts=experts).submodules.experts
    torch.manual_seed(0)
    return cls(experts, config, spec.submodules, pg_collection=get_default_pg_collection())


def _assert_same_state(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, value in want.items():  # tensors, and the linears' extra state (None)
        assert (got[name] is None and value is None) or torch.equal(got[name], value), name


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_grouped_mm_equals_sequential(world_of_one, dtype, tol):
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron.sft.model.moe.grouped_mm import GroupedMMExperts

    ref, fast = _experts(SequentialMLP, dtype), _experts(GroupedMMExperts, dtype)
    # built from the same seed: the same initial weights under the same checkpoint names
    assert list(ref.state_dict()) == list(fast.state_dict())
    _assert_same_state(fast.state_dict(), ref.state_dict())
    # but two 3-D parameters, each with the experts' tensor-parallel attributes one dim in
    params = dict(fast.named_parameters())
    assert list(params) == ["linear_fc1_weight", "linear_fc2_weight"]
    assert params["linear_fc1_weight"].shape == (4, 32, 32)
    assert params["linear_fc2_weight"].shape == (4, 32, 16)
    assert (params["linear_fc1_weight"].partition_dim, params["linear_fc2_weight"].partition_dim,
            params["linear_fc1_weight"].allreduce) == (1, 2, True)
    assert fast.local_experts[0].linear_fc1.weight is None  # nothing held twice
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    fast.load_state_dict(ref.state_dict())  # the same checkpoint names: one loads the other
    again = _experts(SequentialMLP, dtype)
    again.load_state_dict(fast.state_dict())  # ... both ways
    _assert_same_state(again.state_dict(), ref.state_dict())
    tokens = torch.tensor([3, 0, 7, 5])  # an expert without tokens too
    x = torch.randn(int(tokens.sum()), 32, generator=gen).to(dtype)
    probs = torch.rand(int(tokens.sum()), generator=gen)
    dy = torch.randn(int(tokens.sum()), 32, generator=gen).to(dtype)
    outs = []
    for module in (ref, fast):
        xi = x.clone().requires_grad_()
        out, bias = module(xi, tokens, probs)
        assert bias is None
        out.backward(dy)
        outs.append((out, xi.grad))
    (a, ga), (b, gb) = outs
    assert (a.float() - b.float()).abs().max() <= tol * max(1.0, a.float().abs().max())
    assert (ga.float() - gb.float()).abs().max() <= tol * max(1.0, ga.float().abs().max())
    for linear in ("linear_fc1", "linear_fc2"):
        p = torch.stack([getattr(e, linear).weight.grad for e in ref.local_experts])
        q = params[f"{linear}_weight"].grad
        assert (p.float() - q.float()).abs().max() <= tol * max(1.0, p.float().abs().max())


def test_grouped_experts_refuse_a_checkpoint_that_does_not_fit(world_of_one):
    """A missing expert weight or one of another shape is reported as torch reports its own
    (``load_state_dict`` raises, naming the key), not skipped."""
    from megatron.sft.model.moe.grouped_mm import GroupedMMExperts

    fast = _experts(GroupedMMExperts, torch.float32)
    state = fast.state_dict()
    del state["local_experts.2.linear_fc2.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*local_experts\.2\.linear_fc2"):
        fast.load_state_dict(state)
    state = fast.state_dict()
    state["local_experts.1.linear_fc1.weight"] = torch.zeros(16, 32)
    with pytest.raises(RuntimeError, match="size mismatch for local_experts.1.linear_fc1.weight"):
        fast.load_state_dict(state)
    result = fast.load_state_dict({k: v for k, v in fast.state_dict().items()
                                   if "local_experts.0." not in k}, strict=False)
    assert result.missing_keys == ["local_experts.0.linear_fc1.weight",
                                   "local_experts.0.linear_fc2.weight"]
    assert result.unexpected_keys == []


def test_choices_and_errors():
    assert grouped_mm_problem("cpu", torch.float32) is None  # torch 2.13 on CPU, fp32 and bf16
    assert grouped_mm_problem("cpu", torch.bfloat16) is None
    assert resolve_experts_impl("auto", "local", "cpu") == "grouped_mm"
    assert resolve_experts_impl("auto", "te", "cuda") == "te"
    assert resolve_experts_impl("sequential", "local", "cpu") == "sequential"
    with pytest.raises(ExpertsImplError, match="--moe-experts-impl te needs Transformer Engine"):
        resolve_experts_impl("te", "local", "cpu")
    with pytest.raises(ExpertsImplError, match="use one of auto, grouped_mm, sequential, te"):
        resolve_experts_impl("loop", "local", "cpu")
    names = {"decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight": 1,
             "decoder.layers.2.mlp.router.weight": 2}
    te = te_expert_renames(names, to_checkpoint=False)
    assert set(te) == {"decoder.layers.2.mlp.experts.linear_fc1.weight3",
                       "decoder.layers.2.mlp.router.weight"}
    assert te_expert_renames(te, to_checkpoint=True) == names


def test_expert_adapters_under_grouped_mm_equal_the_hooked_sequential_ones(world_of_one):
    """Per-expert LoRA: grouped_mm's two extra grouped GEMMs give what the sequential path's
    forward hooks give (outputs, input and adapter gradients), and both equal the experts with
    ``W + scale * B @ A`` merged in (an expert without tokens too)."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron.sft.lora.adapters import add_adapter
    from megatron.sft.lora.settings import LoRASettings
    from megatron.sft.model.moe.grouped_mm import GroupedMMExperts

    settings = LoRASettings(4, 8.0, routed_experts=True)
    merged = _experts(SequentialMLP, torch.float32)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in merged.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    modules = []
    for cls in (SequentialMLP, GroupedMMExperts):
        m = _experts(cls, torch.float32)
        m.load_state_dict(merged.state_dict())
        for e, expert in enumerate(m.local_experts):
            for target in ("linear_fc1", "linear_fc2"):
                weight = m.expert_weight(e, target) if cls is GroupedMMExperts else None
                add_adapter(getattr(expert, target), target, settings, expert=True,
                            weight=weight)
        modules.append(m)
    with torch.no_grad():
        grouped = dict(modules[1].named_parameters())
        for name, p in modules[0].named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
                grouped[name].copy_(p)
                assert getattr(p, "allreduce", True) is True  # EP1: reduced over all of DP
                assert getattr(grouped[name], "allreduce", True) is True
        for expert, adapted in zip(merged.local_experts, modules[0].local_experts):
            for target in ("linear_fc1", "linear_fc2"):
                lora = getattr(adapted, target).lora
                getattr(expert, target).weight += settings.scale * lora.B @ lora.A
    tokens = torch.tensor([3, 0, 7, 5])
    x = torch.randn(int(tokens.sum()), 32, generator=gen)
    probs = torch.rand(int(tokens.sum()), generator=gen)
    dy = torch.randn(int(tokens.sum()), 32, generator=gen)
    outs = []
    for m in (merged, *modules):
        xi = x.clone().requires_grad_()
        out, _ = m(xi, tokens, probs)
        out.backward(dy)
        outs.append((out, xi.grad, {n: p.grad for n, p in m.named_parameters()
                                    if ".lora." in n}))
    (ref, gref, _), (seq, gseq, wseq), (grp, ggrp, wgrp) = outs
    torch.testing.assert_close(seq, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grp, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gseq, gref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ggrp, gref, rtol=1e-5, atol=1e-4)
    assert sorted(wseq) == sorted(wgrp) and len(wseq) == 4 * 2 * 2
    for name in wseq:
        torch.testing.assert_close(wgrp[name], wseq[name], rtol=1e-5, atol=1e-4, msg=name)
    assert wseq["local_experts.1.linear_fc1.lora.A"].abs().max() == 0  # no tokens, no grad
    assert wseq["local_experts.2.linear_fc1.lora.A"].abs().max() > 0
    with pytest.raises(ExpertsImplError, match="te with LoRA on the routed experts"):
        resolve_experts_impl("te", "te", "cuda", expert_adapters=True)
    assert resolve_experts_impl("auto", "te", "cuda", expert_adapters=True) in (
        "grouped_mm", "sequential")


def test_weight_gradient_goes_into_ddp_main_grad_in_chunks(world_of_one, monkeypatch):
    """Under megatron-core's DDP (a ``main_grad`` buffer and ``grad_added_to_main_grad`` on the
    parameter) the experts' weight gradients are added straight into ``main_grad``, a few
    experts per grouped GEMM, and autograd gets an empty sparse gradient (nothing allocated);
    ``main_grad`` then holds what the per-expert loop's gradients add up to, over two
    micro-batches, with an expert without tokens and a whole chunk without tokens."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron.sft.model.moe import experts as experts_module
    from megatron.sft.model.moe.grouped_mm import GroupedMMExperts

    ref, fast = _experts(SequentialMLP, torch.float32), _experts(GroupedMMExperts, torch.float32)
    fast.load_state_dict(ref.state_dict())
    params = dict(fast.named_parameters())
    for p in params.values():  # as DistributedDataParallel sets them up
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
        p.grad_added_to_main_grad = False
    one_expert = params["linear_fc1_weight"][0].numel() * 4
    monkeypatch.setattr(experts_module, "WGRAD_CHUNK_BYTES", 2 * one_expert)  # 2 experts a chunk
    gen = torch.Generator().manual_seed(3)
    for tokens in (torch.tensor([0, 0, 7, 5]), torch.tensor([3, 0, 4, 1])):
        n = int(tokens.sum())
        x = torch.randn(n, 32, generator=gen)
        probs = torch.rand(n, generator=gen)
        dy = torch.randn(n, 32, generator=gen)
        grads = []
        for module in (ref, fast):
            xi = x.clone().requires_grad_()
            out, _ = module(xi, tokens, probs)
            out.backward(dy)
            grads.append(xi.grad)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)
        for p in params.values():
            assert p.grad_added_to_main_grad is True
            assert p.grad.layout == torch.sparse_coo and p.grad._nnz() == 0
            p.grad = None  # what DDP's hook does once it sees the flag
    for linear in ("linear_fc1", "linear_fc2"):
        want = torch.stack([getattr(e, linear).weight.grad for e in ref.local_experts])
        torch.testing.assert_close(params[f"{linear}_weight"].main_grad, want, rtol=1e-6,
                                   atol=1e-6)
    assert params["linear_fc1_weight"].main_grad[1].abs().max() == 0  # no tokens, no gradient
