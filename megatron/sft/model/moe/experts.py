"""How routed experts are computed (``--moe-experts-impl``), and a fast implementation that
needs neither Transformer Engine nor the ``grouped_gemm`` package.

megatron-core 0.16 offers three expert modules: ``TEGroupedMLP`` (Transformer Engine's grouped
GEMM), ``GroupedMLP`` (the CUDA ``grouped_gemm`` package) and ``SequentialMLP``, a Python loop
with one small matmul per expert and projection, the only one without extra packages. PyTorch
itself now has a grouped GEMM, ``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` in
older releases; CPU fp32/bf16 as well as CUDA), so:

===========  ==============================================================================
choice       experts module
===========  ==============================================================================
grouped_mm   ``GroupedMMExperts``: one 3-D parameter per projection, two grouped GEMMs
sequential   megatron-core's ``SequentialMLP``: the reference
te           megatron-core's ``TEGroupedMLP`` (needs Transformer Engine layers)
auto         ``te`` with Transformer Engine layers, else ``grouped_mm`` where this torch runs it
             on this device and dtype, else ``sequential``
===========  ==============================================================================

``GroupedMMExperts`` (:mod:`megatron.sft.model.moe.grouped_mm`, imported only to build a
model) is a ``SequentialMLP`` (a subclass that keeps its ``__init__``, so the same
initialisation, the same numbers) whose local experts' weights are then moved into one 3-D
parameter per projection: ``linear_fc1_weight`` ``[E, 2F/tp, H]`` and ``linear_fc2_weight``
``[E, H, F/tp]``. Every token, already sorted by expert by the dispatcher, goes through one
grouped GEMM per projection, with ``offs`` the cumulative tokens per expert. Example, 3 local
experts receiving 2, 0 and 3 tokens::

    x [5, H] rows 0-1 -> expert 0, rows 2-4 -> expert 2;  offs = [2, 2, 5]
    h = grouped_mm(x, W1.transpose(1, 2), offs)   [5, 2F]   (row r uses its expert's W1)

Why one parameter and not a stack of the per-expert ones on each forward: the stack is a copy,
and autograd keeps it for the backward pass, so every MoE layer in flight holds a second copy
of its local experts' weights (Qwen3-30B-A3B at EP8: 151 MB a layer, ~7 GB a micro-batch); the
3-D parameter is read in place, and its gradient is one ``[E, ...]`` tensor where the per-expert
one was ``E`` tensors of the same bytes (``benchmarks/bench_grouped_experts.py`` measures it).

What stays as it was: the checkpoint names and bytes. ``state_dict`` gives
``local_experts.{e}.linear_fc1.weight`` (rows of the 3-D parameter) and ``load_state_dict``
reads them (:data:`GROUPED_WEIGHTS`), so checkpoints and exports are those of ``sequential``
and ``te``, and one implementation loads the other's weights. The expert linears stay as
modules (their biases, where a family has them, and LoRA adapters live there) with ``weight``
``None``. What changes: the parameter list, hence the optimizer state's layout: it resumes
only under the implementation that saved it (the checkpoint records it; ``resume`` says so).

The TE expert module names its weights ``linear_fc1.weight{e}``; :func:`te_expert_renames`
maps them to ``SequentialMLP``'s ``local_experts.{e}.linear_fc1.weight``, the checkpoint names.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Optional

import torch

#: ``--moe-experts-impl``'s choices (the CLIs read them from here)
MOE_EXPERTS_IMPLS = ("auto", "grouped_mm", "sequential", "te")
MOE_EXPERTS_HELP = ("routed experts: grouped_mm (torch's grouped GEMM, no extra packages), "
                    "sequential (megatron-core's per-expert loop, the reference), te "
                    "(Transformer Engine's grouped GEMM), auto (te with Transformer Engine "
                    "layers, else grouped_mm where it runs, else sequential)")


class ExpertsImplError(ValueError):
    """An experts implementation that cannot run here; says what to use."""


def grouped_mm_function() -> Optional[Callable[..., torch.Tensor]]:
    """PyTorch's grouped GEMM: ``torch.nn.functional.grouped_mm`` (torch >= 2.10),
    ``torch._grouped_mm`` before that, ``None`` in releases without one."""
    fn = getattr(torch.nn.functional, "grouped_mm", None)
    return fn if fn is not None else getattr(torch, "_grouped_mm", None)


#: the most bytes of one weight-gradient chunk computed before it is added to ``main_grad``
WGRAD_CHUNK_BYTES = 64 * 2**20


def _accumulates_into_main_grad(weight: torch.Tensor) -> bool:
    """megatron-core's DDP gave ``weight`` a ``main_grad`` buffer and the
    ``grad_added_to_main_grad`` flag (instance attributes; Megatron-FSDP's ``main_grad`` is a
    property that allocates, so it is left to its own hooks)."""
    own = vars(weight) if isinstance(weight, torch.nn.Parameter) else {}
    return "main_grad" in own and "grad_added_to_main_grad" in own \
        and not getattr(weight, "__fsdp_param__", False)


class GroupedLinear(torch.autograd.Function):
    """``[T, K] x [G, N, K] -> [T, N]``, one grouped GEMM forward and one for the input
    gradient. The weight gradient ``dW_g = dy_g^T x_g`` goes where megatron-core's
    ``gradient_accumulation_fusion`` puts it: straight into the parameter's fp32 ``main_grad``
    (DDP's buffer), ``WGRAD_CHUNK_BYTES`` of experts at a time, and the flag
    ``grad_added_to_main_grad`` tells DDP's hook not to add it again. Returning it instead
    would materialise one ``[G, N, K]`` tensor per projection on top of the buffer (at 64
    local experts of Qwen3-30B-A3B's shape, 0.75 GiB in fp32 for ``linear_fc1``), where the
    per-expert loop only ever holds one expert's. What autograd gets back for the weight is
    then an empty sparse tensor: DDP's hook needs a gradient to see (it asserts one under
    ``overlap_grad_reduce``) and a sparse one allocates nothing. Without ``main_grad`` (no
    DDP; LoRA's stacked factors) the gradient is returned as usual. The incoming gradient is
    made contiguous (``grouped_mm`` rejects the stride-0 ones ``y.sum().backward()`` gives)."""

    @staticmethod
    def forward(ctx, x, weight, offs):
        ctx.save_for_backward(x, weight, offs)
        ctx.param = weight  # the Parameter itself, with its main_grad (saved tensors lose it)
        return grouped_mm_function()(x, weight.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, dy):
        x, weight, offs = ctx.saved_tensors
        dy = dy.contiguous()
        fn = grouped_mm_function()
        dx = fn(dy, weight, offs=offs) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            param = ctx.param
            if _accumulates_into_main_grad(param):
                _accumulate_wgrad(param.main_grad, dy, x, offs, fn)
                param.grad_added_to_main_grad = True
                dw = torch.sparse_coo_tensor(
                    torch.zeros(weight.dim(), 0, dtype=torch.long, device=weight.device),
                    torch.zeros(0, dtype=weight.dtype, device=weight.device), weight.shape,
                    check_invariants=False, is_coalesced=True)
            else:
                dw = fn(dy.t(), x, offs=offs)
        return dx, dw, None


def _accumulate_wgrad(main_grad: torch.Tensor, dy: torch.Tensor, x: torch.Tensor,
                      offs: torch.Tensor, fn) -> None:
    """``main_grad[g] += dy_g^T x_g`` for every group ``g``, a chunk of groups per grouped GEMM
    (rows ``offs[g0 - 1]:offs[g1 - 1]``), so at most ``WGRAD_CHUNK_BYTES`` are in flight."""
    groups = main_grad.shape[0]
    per_group = main_grad[0].numel() * dy.element_size()
    step = max(1, WGRAD_CHUNK_BYTES // max(per_group, 1))
    if step >= groups:  # one chunk: no row boundaries needed (and no device-to-host sync)
        main_grad.add_(fn(dy.t(), x, offs=offs))
        return
    ends = offs.tolist()
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        r0, r1 = (ends[g0 - 1] if g0 else 0), ends[g1 - 1]
        chunk_offs = offs[g0:g1] - r0
        main_grad[g0:g1].add_(fn(dy[r0:r1].t(), x[r0:r1], offs=chunk_offs))


def grouped_linear(x: torch.Tensor, weights: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` grouped by ``offs`` (cumulative rows per group), each times its group's
    ``weights[g].T``: ``[T, K] x [G, N, K] -> [T, N]``, one grouped GEMM
    (:class:`GroupedLinear`)."""
    return GroupedLinear.apply(x, weights, offs)


@functools.lru_cache(maxsize=None)
def grouped_mm_problem(device_type: str, dtype: torch.dtype) -> Optional[str]:
    """Why this torch cannot run ``GroupedMMExperts`` on ``device_type`` in ``dtype``
    (``None`` when it can): a tiny forward and backward, compared with a per-group matmul."""
    fn = grouped_mm_function()
    if fn is None:
        return f"torch {torch.__version__} has no grouped_mm (torch.nn.functional.grouped_mm " \
               "or torch._grouped_mm)"
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(6, 16, generator=gen).to(device_type, dtype).requires_grad_()
        w = torch.randn(2, 16, 16, generator=gen).to(device_type, dtype).requires_grad_()
        offs = torch.tensor([2, 6], dtype=torch.int32, device=device_type)
        y = grouped_linear(x, w, offs)
        y.float().sum().backward()
        ref = torch.cat([x[:2] @ w[0].T, x[2:] @ w[1].T])
        if not torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2):
            return "grouped_mm gives wrong results here"
    except Exception as e:  # an unsupported device/dtype raises, in several ways
        return f"grouped_mm does not run on {device_type} in {dtype}: {e}"
    return None


def resolve_experts_impl(choice: str, linear: str, device_type: str,
                         dtype: torch.dtype = torch.float32,
                         expert_adapters: bool = False) -> str:
    """``--moe-experts-impl`` -> ``grouped_mm`` | ``sequential`` | ``te`` for layers of kind
    ``linear`` (``te`` / ``local``); asking for one that cannot run is an error naming one that
    can, never a silent fallback. ``expert_adapters``: LoRA puts adapters on each routed
    expert, which ``te`` (one fused op over all experts' weights) cannot carry, so ``auto``
    skips it."""
    if choice not in MOE_EXPERTS_IMPLS:
        raise ExpertsImplError(f"--moe-experts-impl {choice!r}: use one of "
                               f"{', '.join(MOE_EXPERTS_IMPLS)}")
    if choice == "te" and expert_adapters:
        raise ExpertsImplError(
            "--moe-experts-impl te with LoRA on the routed experts: TEGroupedMLP computes all "
            "experts in one op on its own weights, so per-expert adapters cannot be added; use "
            "--moe-experts-impl grouped_mm, or --moe-experts-freeze to adapt the rest only")
    if choice == "te" and linear != "te":
        raise ExpertsImplError(
            "--moe-experts-impl te needs Transformer Engine layers (--transformer-impl "
            "transformer_engine, in the NVIDIA PyTorch container); use --moe-experts-impl "
            "grouped_mm")
    if choice == "grouped_mm":
        problem = grouped_mm_problem(device_type, dtype)
        if problem is not None:
            raise ExpertsImplError(f"--moe-experts-impl grouped_mm: {problem}; use "
                                   "--moe-experts-impl sequential")
    if choice != "auto":
        return choice
    if linear == "te" and not expert_adapters:
        return "te"
    return "grouped_mm" if grouped_mm_problem(device_type, dtype) is None else "sequential"


#: (TEGroupedMLP name, checkpoint = SequentialMLP name) of a routed expert's weight
_TE_GROUPED = re.compile(r"^(.*\.mlp\.experts\.)(linear_fc[12])\.weight(\d+)$")
_SEQUENTIAL = re.compile(r"^(.*\.mlp\.experts\.)local_experts\.(\d+)\.(linear_fc[12])\.weight$")


def te_expert_renames(state: dict[str, Any], to_checkpoint: bool) -> dict[str, Any]:
    """``...mlp.experts.linear_fc1.weight3`` (TE) <-> ``...mlp.experts.local_experts.3.
    linear_fc1.weight`` (checkpoint).

    >>> te_expert_renames({"decoder.layers.0.mlp.experts.linear_fc2.weight1": 0}, True)
    {'decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight': 0}
    """
    out = {}
    for k, v in state.items():
        if to_checkpoint and (m := _TE_GROUPED.match(k)):
            k = f"{m[1]}local_experts.{m[3]}.{m[2]}.weight"
        elif not to_checkpoint and (m := _SEQUENTIAL.match(k)):
            k = f"{m[1]}{m[3]}.weight{m[2]}"
        out[k] = v
    return out


#: ``GroupedMMExperts``' 3-D parameter of each expert linear (``[E, out, in]``, local experts)
GROUPED_WEIGHTS = {"linear_fc1": "linear_fc1_weight", "linear_fc2": "linear_fc2_weight"}
_GROUPED = re.compile(r"^(.*\.mlp\.experts\.)(linear_fc[12])_weight$")


def split_grouped_weights(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """A ``GroupedMMExperts`` parameter by its checkpoint names (one row per local expert);
    any other parameter as it is.

    >>> sorted(split_grouped_weights("decoder.layers.0.mlp.experts.linear_fc2_weight",
    ...                              torch.zeros(2, 4, 3)))
    ['decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight', \
'decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight']
    """
    m = _GROUPED.match(name)
    if m is None:
        return {name: value}
    return {f"{m[1]}local_experts.{e}.{m[2]}.weight": value[e] for e in range(value.shape[0])}


def trains_grouped_experts(chunks: list) -> bool:
    """Whether the optimizer of a run over these model chunks holds ``GroupedMMExperts``' 3-D
    parameters (what its state's layout depends on; frozen experts, as under LoRA or
    ``--moe-experts-freeze``, are not in it)."""
    return any(type(m).__name__ == "GroupedMMExperts" and any(
        getattr(m, name).requires_grad for name in GROUPED_WEIGHTS.values())
        for c in chunks for m in c.modules())
