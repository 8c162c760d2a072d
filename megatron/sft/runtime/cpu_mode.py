"""Run megatron-core's real GPU code paths on a CPU-only machine.

megatron-core assumes CUDA in a few narrow places: it allocates with ``device="cuda"`` or
``torch.cuda.current_device()``, moves tensors with ``.cuda()``, forks the CUDA RNG for
tensor-parallel dropout/initialisation, creates streams/events, and the optimizer asserts
``param.type() == "torch.cuda.FloatTensor"``. None of that is *numerics*: redirecting those
placements to the CPU lets the unmodified TP/PP/DP/distributed-optimizer code run under ``gloo``,
which is how this project tests the engine in CI.

``enable_cpu_mode()`` installs, once per process and only when CUDA is absent:

(a) a ``TorchFunctionMode`` that rewrites every ``cuda`` device argument to ``cpu`` and turns
    ``Tensor.cuda()`` into a no-op;
(b) ``Tensor.type()`` (no arguments) reporting ``torch.cuda.<X>Tensor`` names;
(c) stubs for ``torch.cuda`` device/RNG/stream/event/synchronize/memory calls, with the CUDA RNG
    aliased to the CPU generator, including megatron-core's private
    ``tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state``. ``current_device()`` is
    ordinal ``0``, an int as on a GPU (megatron-core formats it into ``f"cuda:{...}"`` and
    passes it as a device index); what it becomes (``0``, ``"cuda:0"``) is redirected by (a);
(d) ``pin_memory=True`` dropped and ``Tensor.pin_memory()`` a no-op: page-locked memory is a
    host-to-GPU transfer optimisation, and without an accelerator torch refuses it (megatron-core's
    RoPE slicing for context-parallel ranks, ``get_pos_emb_on_this_cp_rank``, asks for it);
(e) megatron-core's MoE ``alltoall`` token dispatcher turns its split sizes into numpy arrays
    through ``moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True)``, but only for tensors that
    ``is_cuda``; under this mode they stay torch tensors, which gloo's ``all_to_all_single``
    rejects ("incompatible function arguments"). The patched helper converts CPU tensors too
    when ``as_numpy=True`` (:func:`_numpy_split_sizes_on_cpu`);
(f) gloo's ``all_gather`` and ``reduce_scatter`` take equal-sized tensors only, while the
    ``alltoall`` dispatcher with expert tensor parallelism and sequence parallelism gathers and
    reduce-scatters *uneven* token counts over the TP ranks (``output_split_sizes`` of
    ``tensor_parallel.mappings._gather_along_first_dim``; NCCL handles those). The patched
    helpers pad to the largest part and gather, or all-reduce and keep this rank's part: the
    same numbers (:func:`_uneven_collectives_on_gloo`);
(h) megatron-core's ``YarnRotaryEmbedding`` (multi-latent attention with YaRN) builds its
    frequencies inside ``with torch.device(torch.cuda.current_device())`` unless told
    ``use_cpu_initialization``, which ``MultiLatentAttention`` does not pass; it is passed here
    (:func:`_yarn_rope_on_cpu`).
(g) custom autograd functions' ``backward`` run under the mode too (``loss.backward()`` runs the
    engine inside the mode's own handler, where the mode is off the stack), so megatron-core's
    TP collectives that allocate on ``current_device()`` in their backward stay on the CPU.

Sequence parallelism runs on CPU too: the local layer spec uses our own sequence-parallel-aware
norms (:mod:`megatron.sft.model.norms`), not megatron-core's ``WrappedTorchNorm``.

Example::

    >>> enable_cpu_mode()             # no-op when torch.cuda.is_available()
    >>> torch.empty(2, device="cuda").device
    device(type='cpu')
    >>> torch.tensor([0, 3], device="cpu", pin_memory=True).cuda(non_blocking=True).tolist()
    [0, 3]
"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE_MODE: "_CudaToCpuMode | None" = None


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return False


def _redirect(value: Any) -> Any:
    """Map a device-like argument to the CPU. A bare int is a CUDA ordinal (``current_device()``)."""
    if _is_cuda_device(value) or (isinstance(value, int) and not isinstance(value, bool)):
        return torch.device("cpu")
    return value


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch function and Tensor method call."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):  # noqa: D401
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs:
            kwargs["device"] = _redirect(kwargs["device"])
        if func is torch.Tensor.to:
            args = (args[0],) + tuple(_redirect(a) for a in args[1:])
        return func(*args, **kwargs)


def _redirect_custom_backward() -> None:
    """Run custom autograd functions' ``backward`` under the mode too.

    ``loss.backward()`` is itself a torch function: the engine runs inside the mode's handler,
    where the mode is off the stack, so megatron-core's TP collectives, which allocate on
    ``torch.cuda.current_device()`` (ordinal 0) in their backward, would ask for ``cuda:0``.
    The engine calls ``BackwardCFunction.apply`` for every custom function; it re-enters the
    mode when it is not on the stack.
    """
    from torch.autograd.function import BackwardCFunction

    original = BackwardCFunction.apply

    def apply(self, *args):
        if _ACTIVE_MODE is None or torch._C._len_torch_function_stack():
            return original(self, *args)
        with _ACTIVE_MODE:
            return original(self, *args)

    BackwardCFunction.apply = apply


class _NoOpStream:
    """Stands in for ``torch.cuda.Stream``: CPU ops are already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _NoOpEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NoOpEvent:
    """Stands in for ``torch.cuda.Event``; timings measured with it read as zero on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _cpu_rng_get(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set(state, *args, **kwargs) -> None:
    torch.set_rng_state(state)


def _stub_torch_cuda() -> None:
    cuda = torch.cuda
    stubs = {
        # Ordinal 0, an int as on a GPU: megatron-core formats it (f"cuda:{...}", Megatron-FSDP)
        # and passes it as an index (torch.device("cuda", ...), FSDP2's device mesh). The
        # placements it becomes ("cuda:0", 0) are redirected by the mode, which custom backward
        # functions also run under (_redirect_custom_backward).
        "current_device": lambda: 0,
        "set_device": lambda *a, **k: None,
        "synchronize": lambda *a, **k: None,
        "get_rng_state": _cpu_rng_get,
        "set_rng_state": _cpu_rng_set,
        "get_rng_state_all": lambda: [torch.get_rng_state()],
        "set_rng_state_all": lambda states: torch.set_rng_state(states[0]),
        "manual_seed": lambda seed: torch.default_generator.manual_seed(int(seed)),
        "manual_seed_all": lambda seed: torch.default_generator.manual_seed(int(seed)),
        "Stream": _NoOpStream,
        "Event": _NoOpEvent,
        "current_stream": lambda *a, **k: _NoOpStream(),
        "default_stream": lambda *a, **k: _NoOpStream(),
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
        "max_memory_reserved": lambda *a, **k: 0,
        "reset_peak_memory_stats": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "nvtx": types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda: None),
    }
    for name, fn in stubs.items():
        setattr(cuda, name, fn)
    torch.cuda.random.get_rng_state = _cpu_rng_get
    torch.cuda.random.set_rng_state = _cpu_rng_set


def _alias_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # The tracker warns when the CPU RNG moves inside a CUDA-RNG fork; with the two generators
    # aliased on CPU that is expected, so the warning would only be noise.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )


def _numpy_split_sizes_on_cpu() -> None:
    """See (d) in the module docstring. ``token_dispatcher`` imported the helper by name, so its
    module global is replaced too."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu
    if getattr(original, "_sft_cpu_mode", False):
        return

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu._sft_cpu_mode = True
    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _uneven_collectives_on_gloo() -> None:
    """See (e) in the module docstring. Even sizes keep megatron-core's own path."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, \
        mappings._reduce_scatter_along_first_dim
    if getattr(gather, "_sft_cpu_mode", False):
        return

    def _even(sizes, group) -> bool:
        return sizes is None or group.size() == 1 or len(set(int(n) for n in sizes)) == 1

    def _gather_along_first_dim(input_, group, output_split_sizes=None,
                                use_global_buffer=False):
        if _even(output_split_sizes, group):
            return gather(input_, group, None, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        width = max(sizes)
        padded = input_.new_zeros((width,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = gather(padded, group, None, False)
        return torch.cat([out[i * width: i * width + n] for i, n in enumerate(sizes)])

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None,
                                        use_global_buffer=False):
        if _even(input_split_sizes, group):
            return reduce_scatter(input_, group, None, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start: start + sizes[group.rank()]].contiguous()

    _gather_along_first_dim._sft_cpu_mode = True
    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


def _yarn_rope_on_cpu() -> None:
    """See (h) in the module docstring."""
    from megatron.core.models.common.embeddings import yarn_rotary_pos_embedding as yarn

    cls = yarn.YarnRotaryEmbedding
    if getattr(cls.__init__, "_sft_cpu_mode", False):
        return
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        kwargs["use_cpu_initialization"] = True
        original(self, *args, **kwargs)

    __init__._sft_cpu_mode = True
    cls.__init__ = __init__


def cpu_mode_active() -> bool:
    return _ACTIVE_MODE is not None


def enable_cpu_mode(force: bool = False) -> bool:
    """Install the CPU redirection once for this process. Returns whether it is active.

    Does nothing on a machine with CUDA unless ``force`` (used by tests that want CPU numerics on
    a GPU box).
    """
    global _ACTIVE_MODE
    if _ACTIVE_MODE is not None:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _stub_torch_cuda()
    _alias_megatron_rng()
    _numpy_split_sizes_on_cpu()
    _uneven_collectives_on_gloo()
    _redirect_custom_backward()
    _yarn_rope_on_cpu()
    mode = _CudaToCpuMode()
    mode.__enter__()
    _ACTIVE_MODE = mode
    return True
