"""Per-GPU memory of a training layout, from the model's own tensors (pure): what a recipe
prints before it launches hundreds of GPUs.

Every HF tensor the architecture table names (``expected_hf_shapes``, so the count is the
model's, MLA and experts included) is placed the way the layout places it: routed experts
split over EP x TP (expert tensor parallelism = TP, as our files are split), everything else
over TP (norms, routers and MLA's latent norms are small and counted whole), layers over PP
stages (the embedding on the first, the final norm and output layer on the last). Per parameter
a rank holds, with ``--bf16 --use-distributed-optimizer``:

- 2 bytes of bf16 weight and 4 of fp32 gradient (megatron-core's ``main_grad`` buffer);
- 12 bytes of Adam state (fp32 master copy, two moments) divided by the data-parallel size
  the parameter is sharded over: ``world / (TP x PP)`` for dense, ``world / (EP x TP x PP)``
  for experts.

Activations under full recompute: each layer's input kept, ``seq x mbs x hidden x 2`` bytes
(/ TP with sequence parallelism), times the stage's layers and the pipeline's in-flight
micro-batches (PP), plus one layer's working set, estimated as 24 such inputs. It is an
estimate (no allocator slack, no communication buffers), printed as one.

Example (DeepSeek-V3's config, 256 GPUs at TP8 EP32, 4k tokens): about 60 GiB of weights,
gradients and optimizer state per GPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from megatron.sft.bridge.architectures import shape_of
from megatron.sft.bridge.stage_mapping import expected_hf_shapes


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The per-GPU estimate of the busiest pipeline stage, in bytes."""

    total_params: int
    rank_dense_params: int
    rank_expert_params: int
    weights: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        gib = 1 << 30
        return (f"{self.total_params / 1e9:.1f}B parameters; per GPU {self.rank_dense_params / 1e9:.2f}B "
                f"dense + {self.rank_expert_params / 1e9:.2f}B expert: weights "
                f"{self.weights / gib:.1f} GiB + gradients {self.grads / gib:.1f} GiB + optimizer "
                f"{self.optimizer / gib:.1f} GiB + activations ~{self.activations / gib:.1f} GiB = "
                f"~{self.total / gib:.0f} GiB (estimate)")


def _layer(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else -1


def plan_memory(hf_config: dict[str, Any], *, world: int, tp: int = 1, pp: int = 1,
                ep: int = 1, seq_length: int = 4096, micro_batch_size: int = 1,
                sequence_parallel: bool = True) -> MemoryPlan:
    """The estimate for ``world`` GPUs at TP x PP x EP (see the module docstring)."""
    if world % (tp * pp) or (world // (tp * pp)) % ep:
        raise ValueError(f"{world} GPUs do not split into TP {tp} x PP {pp} with EP {ep} "
                         "dividing the data-parallel size")
    _, shape = shape_of(hf_config)
    if shape.num_layers % pp:
        raise ValueError(f"PP {pp} does not divide the {shape.num_layers} layers")
    per_stage = shape.num_layers // pp
    dense = [0] * pp
    expert = [0] * pp
    total = 0
    for name, dims in expected_hf_shapes(*shape_of(hf_config)).items():
        n = math.prod(dims)
        total += n
        layer = _layer(name)
        stage = (layer // per_stage if layer >= 0 else
                 0 if "embed_tokens" in name else pp - 1)
        if ".experts." in name:
            expert[stage] += n // (ep * tp)
        else:
            dense[stage] += n // (tp if len(dims) > 1 else 1)
    busiest = max(range(pp), key=lambda s: dense[s] + expert[s])
    d, e = dense[busiest], expert[busiest]
    dp = world // (tp * pp)
    edp = dp // ep
    act_unit = seq_length * micro_batch_size * shape.hidden_size * 2 // (
        tp if sequence_parallel else 1)
    return MemoryPlan(total_params=total, rank_dense_params=d, rank_expert_params=e,
                      weights=2 * (d + e), grads=4 * (d + e),
                      optimizer=12 * d // dp + 12 * e // edp,
                      activations=act_unit * (per_stage * pp + 24))
