"""CPU mode redirects megatron-core's CUDA assumptions. It patches process-wide torch state, so
each check runs in a fresh interpreter."""

import subprocess
import sys
import textwrap

from sft_testing import REPO


def _run(code: str) -> subprocess.CompletedProcess:
    prog = "import warnings; warnings.filterwarnings('ignore')\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
                                         "PATH": "/usr/bin:/bin"}, timeout=120)


def test_cuda_placements_become_cpu():
    r = _run("""
        import torch
        from megatron.sft.runtime.cpu_mode import enable_cpu_mode, cpu_mode_active
        assert not cpu_mode_active()
        assert enable_cpu_mode() and cpu_mode_active()
        x = torch.empty(3, device="cuda")
        assert x.device.type == "cpu"
        assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
        assert x.cuda() is x
        assert x.to("cuda").device.type == "cpu" and x.to(torch.cuda.current_device()).device.type == "cpu"
        assert x.to(torch.float64).dtype == torch.float64
        assert x.type() == "torch.cuda.FloatTensor"
        assert x.type(torch.float64).dtype == torch.float64
        # megatron-core's CP RoPE slicing pins memory before moving to the GPU
        assert torch.tensor([1, 2], pin_memory=True).cuda(non_blocking=True).tolist() == [1, 2]
        assert x.pin_memory() is x
        ev = torch.cuda.Event(enable_timing=True); ev.record(); torch.cuda.synchronize()
        with torch.cuda.stream(torch.cuda.Stream()):
            pass
        # Megatron-FSDP formats the ordinal, FSDP2's device mesh passes it as an index
        index = torch.cuda.current_device()
        assert type(index) is int and index == 0
        assert torch.empty(1, device=torch.device(f"cuda:{index}")).device.type == "cpu"
        assert torch.zeros(1, device=torch.device("cuda", index=index)).device.type == "cpu"
        # megatron-core's TP collectives allocate on current_device() inside custom backward
        # functions, which the engine runs inside backward()'s own torch-function call
        class AllocatesInBackward(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x * 2
            @staticmethod
            def backward(ctx, g):
                return g + torch.zeros(g.shape, device=torch.cuda.current_device())
        x = torch.ones(3, requires_grad=True)
        AllocatesInBackward.apply(x).sum().backward()
        assert torch.equal(x.grad, torch.ones(3))
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_cuda_rng_is_the_cpu_generator_and_tracker_forks_restore():
    r = _run("""
        import torch
        from megatron.sft.runtime.cpu_mode import enable_cpu_mode
        enable_cpu_mode()
        torch.cuda.manual_seed(5)
        a = torch.rand(4)
        torch.manual_seed(5)
        assert torch.equal(a, torch.rand(4)), "cuda seed must drive the CPU generator"
        from megatron.core.tensor_parallel import random as R
        R.get_cuda_rng_tracker().add("model-parallel-rng", 123)
        before = torch.get_rng_state()
        with R.get_cuda_rng_tracker().fork():
            inside = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), before), "fork must restore the outer state"
        torch.manual_seed(123)
        assert torch.equal(inside, torch.rand(3)), "fork must use the tracker's own seed"
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
