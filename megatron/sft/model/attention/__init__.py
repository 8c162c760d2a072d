"""Core attention for packed SFT rows, and the registry behind ``--attention-backend``.

megatron-core's layer spec calls a *core attention* module with ``query [s, b, hq, d]`` and
``key``/``value [s, b, hkv, d]`` (RoPE already applied, heads already split across TP ranks) and
expects ``[s, b, hq * d]`` back. :class:`PackedCoreAttention` is that module for the packed
backends. Which tokens may attend to which is described by :class:`DocumentSegments`, carried to
every layer inside megatron-core's own ``packed_seq_params`` argument (``qkv_format="sbhd"``, so
megatron-core keeps the ``[s, b]`` layout and its usual RoPE: RoPE is relative, so positions that
do not restart at each document give the same attention as positions that do once documents are
isolated).

Backends (all causal within a document, GQA without copying K/V where the kernel allows it, an
optional sliding window of ``W`` tokens: query ``i`` sees keys ``i - W < j <= i``, as in HF), in
the order of ``--attention-backend``'s choices:

- ``te``     Transformer Engine's ``TEDotProductAttention`` on THD-flattened rows (TE layers).
- ``varlen`` ``torch.nn.attention.varlen.varlen_attn`` over the flattened tokens (CUDA).
- ``flex``   ``flex_attention`` with a document-causal ``BlockMask`` (CUDA; compiled).
- ``sdpa``   ``scaled_dot_product_attention`` per document (or per row when unpacked); exact, CPU
             and GPU, O(sum l_i^2) work, no s x s tensor unless a window forces a banded mask.
- ``dense``  megatron-core's ``DotProductAttention`` with a ``[b, 1, s, s]`` mask (reference).

Context parallelism (``--context-parallel-size``): ``sdpa``, ``varlen`` and ``flex`` run this
rank's queries against K/V all-gathered over the CP group (their ``cp_kernel``, in
:mod:`megatron.sft.model.context_parallel.kernels`, on the pieces of :mod:`megatron.sft.model.context_parallel.split`);
``te`` uses Transformer Engine's own CP attention on documents padded to ``2·CP``; ``dense``
has none.

Each is one :class:`AttentionBackendSpec` registered next to its code; ``--attention-backend``'s
choices and help (``tools/train_sft.py``, ``tools/check_hf_parity.py``), ``auto``'s choice,
the start-up checks, :class:`~megatron.sft.model.layer_impl.LayerImpl` and
:class:`PackedCoreAttention` all read the registry.

Adding an attention backend (this file only)
--------------------------------------------
1. Write the kernel ``(q, k, v, segments, scale, window) -> out`` on ``[t, h, d]`` tensors
   (``t`` = the micro-batch's flattened tokens; ``segments.bounds`` for per-document loops,
   ``segments.cu_seqlens_q`` / ``max_document_length`` for varlen kernels).
2. Right below it call ``register_backend(AttentionBackendSpec(name=..., description=...,
   devices=..., requires=..., auto_rank=..., kernel=...))``. That is all: the name becomes a
   CLI choice (in registration order), the description its ``--help`` entry, ``devices``/``requires`` the error at start
   naming the alternative, ``auto_rank`` its place in ``auto``'s order, and
   ``PackedCoreAttention`` calls the kernel. A backend that is not a packed kernel (like ``te``
   or ``dense``) gives ``build_inputs`` (what a micro-batch passes to the model) and
   ``build_core_attention`` (the module in the layer spec) instead. For context parallelism
   give ``cp_kernel`` (local queries against all-gathered K/V, reading
   ``segments.cp_pieces``) or, when the backend's own module does CP, ``cp_native=True`` and
   a ``build_inputs`` that cuts the micro-batch (``AttentionInputs.local_index``).
3. ``tests/unit/runtime/test_attention_registry.py`` iterates the registry: every packed kernel
   that runs on CPU is compared with :func:`dense_reference_attention` there, every one on CUDA
   in ``tests/gpu/test_attention_backends_gpu.py``; nothing to add unless the backend has
   behaviour of its own. (The README's table of backends is for users: give it a row.)

The pure functions (``segments_from_cu_seqlens``, ``*_attention``) take ``[t, h, d]`` tensors and
are tested directly against a dense masked softmax. Importing this module costs no megatron-core
import (``--help`` reads the registry): megatron-core is imported where a backend first needs it.
"""

from __future__ import annotations

from typing import Any

# Importing the backends registers them: every reader of the registry goes through this package.
from megatron.sft.model.attention import backends as _backends  # noqa: F401
from megatron.sft.model.attention.backends import (  # noqa: F401
    dense_reference_attention,
    flex_attention_packed,
    sdpa_attention,
    varlen_attention,
    varlen_available,
)
from megatron.sft.model.attention.core import PackedCoreAttention  # noqa: F401
from megatron.sft.model.attention.registry import (  # noqa: F401
    AttentionBackendSpec,
    AttentionInputs,
    attention_backend_choices,
    attention_backend_help,
    attention_backends,
    auto_backend,
    auto_order,
    get_attention_backend,
    packed_attention_inputs,
    register_backend,
)
from megatron.sft.model.attention.segments import (  # noqa: F401
    banded_causal_mask,
    document_segments,
    packed_attention_mask,
    segment_ids,
    segments_from_cu_seqlens,
)


def __getattr__(name: str) -> Any:
    """``from megatron.sft.model.attention import DocumentSegments`` builds the class."""
    if name == "DocumentSegments":
        from megatron.sft.model.attention.segments import _document_segments_class

        return _document_segments_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
