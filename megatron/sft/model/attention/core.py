"""``PackedCoreAttention``: the core-attention module the layer spec builds for the packed
backends, at CP1 and (K/V all-gathered) CP > 1.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron.sft.model.attention.registry import get_attention_backend
from megatron.sft.model.attention.segments import _document_segments_class, document_segments


def layer_window(config, layer_number: int) -> Optional[int]:
    """The sliding window of layer ``layer_number`` (1-based, global) from megatron-core's
    ``window_size`` and ``window_attn_skip_freq`` (GPT-OSS's ``layer_types``: windowed and
    full layers alternating), as megatron-core's own attention reads them; ``None``: full.

    >>> from types import SimpleNamespace as C
    >>> [layer_window(C(window_size=(127, 0), window_attn_skip_freq=2), n) for n in (1, 2)]
    [128, None]
    """
    size = getattr(config, "window_size", None)
    if not size:
        return None
    from megatron.core.transformer.utils import is_layer_window_attention

    if is_layer_window_attention(size, config.window_attn_skip_freq, layer_number):
        return int(size[0]) + 1
    return None


# --------------------------------------------------------------------------------- module
class PackedCoreAttention(torch.nn.Module):
    """Drop-in for megatron-core's ``DotProductAttention`` in a layer spec, running a packed
    backend's registered kernel.

    Built by megatron-core's ``SelfAttention`` with its usual keyword arguments; ``backend``
    and ``window`` are bound with ``functools.partial`` by
    :meth:`AttentionBackendSpec.core_attention`. No parameters, so checkpoints are unaffected.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, *, backend: str,
                 window: Optional[int] = None):
        super().__init__()
        spec = get_attention_backend(backend)
        kernel = spec.kernel
        if kernel is None:
            raise ValueError(f"--attention-backend {backend} has no packed kernel: its layer "
                             "spec keeps megatron-core's core attention")
        self.cp_size = config.context_parallel_size
        if self.cp_size > 1:
            if spec.cp_kernel is None:
                raise ValueError(spec.check("local", "cpu", self.cp_size))
            kernel = spec.cp_kernel
        #: the context-parallel group (megatron-core hands its process groups to the module)
        self.cp_group = getattr(pg_collection, "cp", None)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"--attention-backend {backend} has no attention dropout "
                             f"(attention_dropout={dropout})")
        self.config = config
        self.backend = backend
        self.kernel = kernel
        self.window = window if window is not None else layer_window(config, layer_number)
        #: learnable attention sinks (``softmax_type="learnable"``, GPT-OSS), one per local head
        #: under megatron-core's name; ``None`` without (``attention.sinks``)
        self.softmax_offset = None
        if getattr(config, "softmax_type", "vanilla") == "learnable":
            self._add_sinks(config, backend)
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(
            config.kv_channels)

    def _add_sinks(self, config, backend: str) -> None:
        from megatron.sft.model.attention import sinks

        self.kernel = sinks.sink_kernel(backend, self.cp_size)
        heads = config.num_attention_heads // config.tensor_model_parallel_size
        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() \
            else torch.cuda.current_device()
        self.softmax_offset = torch.nn.Parameter(
            torch.zeros(heads, dtype=config.params_dtype, device=device))
        # split over TP ranks by heads, as the query heads are
        self.softmax_offset.tensor_model_parallel = True
        self.softmax_offset.partition_dim = 0
        self.softmax_offset.partition_stride = 1

    def _run(self, q, k, v, segments):
        if self.softmax_offset is None:
            return self.kernel(q, k, v, segments, self.scale, self.window)
        return self.kernel(q, k, v, segments, self.scale, self.window, self.softmax_offset)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError(f"--attention-backend {self.backend} takes no attention bias")
        s, b, hq, d = query.shape
        segments = packed_seq_params
        if self.cp_size > 1:
            return self._context_parallel(query, key, value, segments)
        if not isinstance(segments, _document_segments_class()):  # unpacked: a document a row
            segments = document_segments(None, b, s, query.device)
        # [s, b, h, d] -> [b*s, h, d]: documents are contiguous runs of the flattened rows.
        q, k, v = (x.transpose(0, 1).reshape(b * s, x.shape[2], d) for x in (query, key, value))
        out = self._run(q, k, v, segments)
        return out.reshape(b, s, hq * d).transpose(0, 1).contiguous()

    def _context_parallel(self, query, key, value, segments):
        """This rank's ``s / CP`` queries against every rank's keys and values: K/V are
        all-gathered over the CP group (backward reduce-scatters dK, dV), put back in row
        order, and the backend's ``cp_kernel`` runs on the rank's pieces."""
        from megatron.sft.model.context_parallel.gather import gather_sequence

        if not isinstance(segments, _document_segments_class()) or segments.cp_size != \
                self.cp_size:
            raise ValueError(f"--attention-backend {self.backend} at context parallel size "
                             f"{self.cp_size} needs this rank's document pieces in "
                             "packed_seq_params (AttentionBackendSpec.attention_inputs with "
                             "cp_size)")
        s_local, b, hq, d = query.shape
        s = segments.row_length
        key, value = (gather_sequence(x, s, self.cp_group) for x in (key, value))
        q = query.transpose(0, 1).reshape(b * s_local, hq, d)
        k, v = (x.transpose(0, 1).reshape(b * s, x.shape[2], d) for x in (key, value))
        out = self._run(q, k, v, segments)
        return out.reshape(b, s_local, hq * d).transpose(0, 1).contiguous()
