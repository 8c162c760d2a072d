"""The megatron-core 0.16.1 fixes MoE needs without Transformer Engine, each shown broken
first and fixed after (in one fresh interpreter: both patch process-wide module state, and
starting one costs seconds)."""

import subprocess
import sys
import textwrap

from sft_testing import REPO


def _run(code: str) -> subprocess.CompletedProcess:
    prog = "import warnings; warnings.filterwarnings('ignore')\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
                                         "PATH": "/usr/bin:/bin"}, timeout=120)


def test_router_without_te_and_alltoall_split_sizes_on_cpu():
    r = _run("""
        # (1) the router's gating linear without Transformer Engine
        import torch
        from megatron.core.transformer.moe import moe_utils
        x = torch.randn(5, 8, requires_grad=True)
        w = torch.randn(4, 8, requires_grad=True)
        try:
            moe_utils.router_gating_linear(x, w, None, torch.float32)
            raise SystemExit("expected the NameError of megatron-core 0.16.1 without TE")
        except NameError as e:
            assert "te_general_gemm" in str(e), e
        from megatron.sft.runtime.mcore_compat import fix_moe_router_without_te
        assert fix_moe_router_without_te() and not fix_moe_router_without_te()  # idempotent
        y = moe_utils.router_gating_linear(x, w, None, torch.float32)
        y.square().sum().backward()
        assert torch.allclose(y, x @ w.T) and x.grad is not None and w.grad is not None

        # (2) the alltoall dispatcher's split sizes under CPU mode
        import numpy as np
        from megatron.core.transformer.moe import token_dispatcher
        sizes = torch.tensor([3, 5])
        assert torch.is_tensor(moe_utils.maybe_move_tensor_to_cpu(sizes, as_numpy=True))
        from megatron.sft.runtime.cpu_mode import enable_cpu_mode
        enable_cpu_mode()
        for helper in (moe_utils.maybe_move_tensor_to_cpu,
                       token_dispatcher.maybe_move_tensor_to_cpu):
            out = helper(sizes, as_numpy=True)
            assert isinstance(out, np.ndarray) and out.tolist() == [3, 5]
            assert helper(sizes) is sizes  # without as_numpy: unchanged

        # (3) the expert-bias token count with a [tokens] padding mask (DeepSeek-V3)
        import types
        from megatron.core.transformer.moe.router import TopKRouter
        router = types.SimpleNamespace(enable_expert_bias=True,
                                       local_tokens_per_expert=torch.zeros(3))
        routing_map = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]]).bool()
        padding = torch.tensor([False, False, True, False])  # token 2 is padding
        try:
            TopKRouter._apply_expert_bias(router, routing_map, padding)
            raise SystemExit("expected megatron-core 0.16.1's broadcast error")
        except RuntimeError as e:
            assert "size of tensor" in str(e) or "broadcast" in str(e), e
        from megatron.sft.runtime.mcore_compat import fix_expert_bias_padding_mask
        assert fix_expert_bias_padding_mask() and not fix_expert_bias_padding_mask()
        TopKRouter._apply_expert_bias(router, routing_map, padding)
        assert router.local_tokens_per_expert.tolist() == [1.0, 1.0, 3.0]  # by hand
        print("ok")
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok"
