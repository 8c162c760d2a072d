"""TP x PP (x VPP) sharding arithmetic for checkpoints (pure).

Megatron-LM's file layout: one ``model_optim_rng.pt`` per (tp, pp) rank under
``iter_NNNNNNN/mp_rank_TT`` (PP=1) or ``mp_rank_TT_PPP`` (PP>1). With virtual pipeline stages a
rank's file holds ``model0, model1, ...`` (one per chunk) instead of ``model``.

Layer assignment matches megatron-core's ``get_transformer_layer_offset`` for even splits.
Example, 8 layers, PP=2, VPP=2 (chunks of 2 layers)::

    pp0: chunk0 -> layers [0, 1]   chunk1 -> layers [4, 5]
    pp1: chunk0 -> layers [2, 3]   chunk1 -> layers [6, 7]
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.sft.bridge.model_shape import ModelShape


class LayoutError(ValueError):
    """A parallel layout that cannot shard this model."""


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    #: number of virtual pipeline chunks per pipeline rank (``None`` = no interleaving)
    vpp: Optional[int] = None

    @property
    def chunks(self) -> int:
        return self.vpp or 1

    def describe(self) -> str:
        """``TP2 PP1``, ``TP1 PP2 VPP2``: how messages name a layout."""
        return f"TP{self.tp} PP{self.pp}" + (f" VPP{self.vpp}" if self.vpp else "")

    def validate(self, shape: ModelShape) -> None:
        """Raise :class:`LayoutError` with the numbers and a fix when the split is impossible."""
        problems = []
        if self.tp < 1 or self.pp < 1 or (self.vpp is not None and self.vpp < 1):
            problems.append(f"sizes must be >= 1 (got TP={self.tp}, PP={self.pp}, VPP={self.vpp})")
        else:
            if shape.num_attention_heads % self.tp:
                problems.append(
                    f"TP={self.tp} does not divide num_attention_heads={shape.num_attention_heads}"
                )
            ng = shape.num_query_groups
            # TP may exceed the KV heads when it is a multiple of them: megatron-core then
            # gives each KV head to TP/ng ranks (the fused QKV rows are split as usual).
            if ng % self.tp and self.tp % ng:
                problems.append(
                    f"TP={self.tp} and num_key_value_heads={ng}: one must divide the other"
                )
            elif self.tp > ng and (shape.dim("q") + 2 * shape.dim("kv")) % self.tp:
                problems.append(f"TP={self.tp} does not divide the fused QKV rows "
                                f"{shape.dim('q') + 2 * shape.dim('kv')}")
            if shape.ffn_hidden_size % self.tp:
                problems.append(
                    f"TP={self.tp} does not divide intermediate_size={shape.ffn_hidden_size}"
                )
            stages = self.pp * self.chunks
            if shape.num_layers % stages:
                what = f"PP={self.pp}" + (f" x VPP={self.vpp}" if self.vpp else "")
                problems.append(f"{what} does not divide num_hidden_layers={shape.num_layers}")
            if self.vpp is not None and self.vpp > 1 and self.pp < 2:
                problems.append("virtual pipeline stages need PP >= 2")
        if problems:
            ng = shape.num_query_groups
            divisors = [d for d in range(1, shape.num_attention_heads + 1)
                        if (ng % d == 0 or d % ng == 0) and shape.num_attention_heads % d == 0
                        and shape.ffn_hidden_size % d == 0
                        and (d <= ng or (shape.dim("q") + 2 * shape.dim("kv")) % d == 0)]
            layer_divs = [d for d in range(1, shape.num_layers + 1) if shape.num_layers % d == 0]
            raise LayoutError(
                "cannot shard this model: " + "; ".join(problems)
                + f". Valid TP sizes: {divisors}; valid PP (x VPP) sizes: {layer_divs}"
            )

    def layers_per_chunk(self, shape: ModelShape) -> int:
        return shape.num_layers // (self.pp * self.chunks)

    def chunk_layers(self, shape: ModelShape, pp_rank: int, chunk: int) -> range:
        """Global layer indices held by ``(pp_rank, chunk)``."""
        n = self.layers_per_chunk(shape)
        start = chunk * (shape.num_layers // self.chunks) + pp_rank * n
        return range(start, start + n)

    def has_embedding(self, pp_rank: int, chunk: int) -> bool:
        return pp_rank == 0 and chunk == 0

    def has_output(self, pp_rank: int, chunk: int) -> bool:
        return pp_rank == self.pp - 1 and chunk == self.chunks - 1

    def model_key(self, chunk: int) -> str:
        """State-dict key of a chunk inside ``model_optim_rng.pt``."""
        return "model" if self.vpp is None else f"model{chunk}"


def virtual_stages(num_layers: int, pp: int, layers_per_virtual_stage: Optional[int]
                   ) -> Optional[int]:
    """Megatron-LM's ``--num-layers-per-virtual-pipeline-stage`` -> chunks per pipeline rank.

    >>> virtual_stages(8, 2, 2)
    2
    >>> virtual_stages(8, 2, 4) is None
    True
    """
    if not layers_per_virtual_stage:
        return None
    if num_layers % (pp * layers_per_virtual_stage):
        raise LayoutError(
            f"{layers_per_virtual_stage} layers per virtual pipeline stage x PP {pp} does not "
            f"divide the model's {num_layers} layers")
    chunks = num_layers // (pp * layers_per_virtual_stage)
    return chunks if chunks > 1 else None  # one chunk per rank is plain (non-interleaved) PP


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """``mp_rank_01`` (PP=1) or ``mp_rank_01_002`` (PP>1), as Megatron-LM names them."""
    if pp_size == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"
