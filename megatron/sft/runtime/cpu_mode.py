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
(e) custom autograd functions' ``backward`` run under the mode too (``loss.backward()`` runs the
    engine inside the mode's own handler, where the mode is off the stack), so megatron-core's
    TP collectives that allocate on ``current_device()`` in their backward stay on the CPU.

(d) ``sequence_parallel`` must stay off on CPU (torch norms do not support it); the model config
builder enforces that, not this module.

Example::

    >>> enable_cpu_mode()             # no-op when torch.cuda.is_available()
    >>> torch.empty(2, device="cuda").device
    device(type='cpu')
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
        if func is torch.Tensor.cuda:
            return args[0]
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
    _redirect_custom_backward()
    mode = _CudaToCpuMode()
    mode.__enter__()
    _ACTIVE_MODE = mode
    return True
