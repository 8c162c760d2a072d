"""Export of routed experts in an architecture's fused form (``ArchitectureSpec.
export_fused_experts``: GPT-OSS, whose HF class loads only ``mlp.experts.gate_up_proj [E, ...]``).

The reader yields one tensor per expert under the table's per-expert names
(``model.layers.3.mlp.experts.{e}.down_proj``); :class:`FusedExport` stacks each layer's ``E``
of them into the fused tensor, in the order the last of them arrives, so the planned entries
and the stream agree. It holds a fused tensor's parts until its last expert arrives: with EP
the experts of EP rank 0 wait for those of the later ranks of their stage.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch


class FusedExport:
    def __init__(self, spec, shape):
        self.experts = shape.moe.num_experts
        #: per-expert name -> (fused name, expert)
        self.part_of: dict[str, tuple[str, int]] = {}
        for layer in shape.moe.layers:
            for f in spec.fused_experts.tensors:
                if len(f.parts) != 1:
                    raise ValueError(f"table error: fused export of {f.fused} with several "
                                     "parts per expert is not implemented")
                for e in range(self.experts):
                    self.part_of[f.parts[0].format(i=layer, e=e)] = (f.fused.format(i=layer), e)

    def entries(self, entries: list) -> list:
        """The planned ``(name, dtype, shape)`` list with each layer's parts as one tensor."""
        seen: dict[str, int] = {}
        out = []
        for name, dtype, shape in entries:
            if name not in self.part_of:
                out.append((name, dtype, shape))
                continue
            fused, _ = self.part_of[name]
            seen[fused] = seen.get(fused, 0) + 1
            if seen[fused] == self.experts:
                out.append((fused, dtype, (self.experts,) + tuple(shape)))
        return out

    def stream(self, tensors: Iterator) -> Iterator[tuple[str, torch.Tensor]]:
        parts: dict[str, list] = {}
        for name, tensor in tensors:
            if name not in self.part_of:
                yield name, tensor
                continue
            fused, e = self.part_of[name]
            held = parts.setdefault(fused, [None] * self.experts)
            held[e] = tensor
            if all(t is not None for t in held):
                yield fused, torch.stack(held)
                del parts[fused]


def fused_export(spec, shape) -> Optional[FusedExport]:
    """The fused export of ``spec``'s experts, or ``None`` when it exports them one a tensor."""
    if not getattr(spec, "export_fused_experts", False) or shape.moe is None:
        return None
    return FusedExport(spec, shape)
