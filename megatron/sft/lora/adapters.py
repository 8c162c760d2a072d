"""LoRA adapter modules on megatron-core's tensor-parallel linears, attached to a built model
(freezing its base), under the local layer spec or the Transformer Engine one (which linear
classes, and how each is recognised: :mod:`megatron.sft.lora.bases`).

A targeted linear ``y = W x`` becomes ``y = W x + (alpha / r) · B · A · x`` with ``A: [r, in]``
and ``B: [out, r]``; ``W`` is frozen. Each adapter is split over tensor-parallel ranks the way
its base layer is, so the sum is exact at any TP size:

- **column-parallel base** (``linear_qkv``, ``linear_fc1``; ``W`` split by output rows): ``A`` is
  replicated, ``B`` holds this rank's output rows, in the base weight's own row order (fused
  QKV per query group, ``[gate_shard; up_shard]`` for fc1). ``A·x`` is the same on every rank;
  its gradient is a sum over all ranks' output rows, so ``h = A·x`` passes through megatron's
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward).
- **row-parallel base** (``linear_proj``, ``linear_fc2``; ``W`` split by input columns, output
  all-reduced): ``A`` holds this rank's input columns, ``B`` is replicated. The partial
  ``A_rank·x_rank`` are summed with ``reduce_from_tensor_model_parallel_region`` (all-reduce
  forward, identity backward) before ``B``, exactly like the base's own reduce.

With sequence parallelism (``--sequence-parallel``) a column-parallel base gets ``x`` for this
rank's ``s / TP`` tokens and all-gathers it inside; a row-parallel base reduce-scatters its output
to ``s / TP`` tokens. The adapter follows on its rank-``r`` middle, which is cheaper to move
than ``x``: column, ``h = all_gather(A·x_local)`` (backward reduce-scatters); row,
``h = reduce_scatter(A_rank·x_rank)`` (backward all-gathers) before ``B``. The replicated
factor (``A`` of a column adapter, ``B`` of a row one) then sees only this rank's tokens, so
it is marked ``sequence_parallel`` and megatron-core all-reduces its gradient over TP, as it
does for the norms.

Worked shapes, hidden 64, 4 heads / 2 KV groups of head_dim 16, r = 8, TP = 2::

    linear_qkv  W [64, 64] per rank (128 rows / 2)  A [8, 64] (replicated)  B [64, 8]
    linear_proj W [64, 32] per rank (64 cols / 2)   A [8, 32] (input half)  B [64, 8] (replicated)

The Transformer Engine spec fuses the input norm into ``linear_qkv`` / ``linear_fc1``
(``TELayerNormColumnParallelLinear``): the module receives un-normalised hidden states and
``W`` sees ``norm(x)``. Its adapter is fed the same ``norm(x)``, recomputed from the module's own
norm parameters (:func:`megatron.sft.lora.bases.fused_input_norm`), so both specs train the same model. That
costs one extra norm per fused linear; asking TE for its norm output instead
(``return_layernorm_output``) would change the ``(out, bias)`` contract megatron-core unpacks.

**Routed experts** (``settings.routed_experts``): each local expert of a Mixture-of-Experts
layer has its own adapters on its ``linear_fc1``/``linear_fc2``
(``decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.lora.A``, local indices as the
expert weights in each expert-parallel rank's file). An expert linear leaves its communication
to the token dispatcher (megatron-core's ``explicit_expert_comm``): its input is already on
every expert-TP rank and its row-parallel output is a partial sum the dispatcher reduces. The
adapter does the same: no communication in its forward, and since its replicated factor (A of
fc1, B of fc2) then gets only this rank's part of the gradient, that factor goes through
``copy_to_tensor_model_parallel_region`` over the expert-TP group (identity forward, gradient
all-reduced). Its parameters carry the base's ``allreduce = False``, so megatron-core's DDP
reduces them over the expert-data-parallel group, like the expert weights. Each expert's
initial A is drawn from (seed, layer, target, *global* expert index), so any EP size trains
the same model. ``GroupedMMExperts`` reads its linears' weights without calling them; it adds
the experts' updates itself with two more grouped GEMMs (:func:`expert_update`).

The adapter is a child module named ``lora`` of the base linear under either spec, so the base's
parameter names (and checkpoints) are unchanged and adapter tensors read
``decoder.layers.0.self_attention.linear_qkv.lora.A`` whichever spec saved or loads them. A
forward hook adds the update to the base's ``(output, bias)`` tuple.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch

from megatron.sft.bridge import transforms as T
from megatron.sft.bridge.checkpoint_io import CheckpointError, CheckpointMetadata, load_rank_state

from megatron.sft.lora.bases import (
    BYPASSING_PARENTS,
    BaseLinear,
    LoRABaseError,
    adapter_shape,
    fused_input_norm,
    recognise_base,
)
from megatron.sft.lora.settings import (  # noqa: F401  (adapters' vocabulary, re-exported)
    ADAPTER_MARK,
    LORA_TARGETS,
    PARENT,
    LoRASettings,
    is_adapter_name,
)
from megatron.sft.runtime.parallel_dims import parallel_dims
from megatron.sft.runtime.wrapping import unwrap_model

class LoRAAdapter(torch.nn.Module):
    """The ``B·A`` update of one tensor-parallel linear (see the module docstring).

    ``in_features`` / ``out_features`` are this rank's sizes of ``A``'s input and ``B``'s
    output, read from the base weight (:func:`megatron.sft.lora.bases.adapter_shape`).
    """

    def __init__(self, parallel: Literal["column", "row"], in_features: int, out_features: int,
                 settings: LoRASettings, dtype: torch.dtype, device: Optional[torch.device],
                 sequence_parallel: bool = False, expert_group: Any = None,
                 allreduce: bool = True):
        """``expert_group``: the expert-TP process group when the base is a routed expert's
        linear (module docstring); ``allreduce``: the base weight's (False for expert-parallel
        experts, so DDP reduces over the expert-data-parallel group)."""
        super().__init__()
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        self.parallel = parallel
        self.expert_group = expert_group
        self.sequence_parallel = sequence_parallel and expert_group is None
        self.scale = settings.scale
        self.dropout = torch.nn.Dropout(settings.dropout) if settings.dropout else None
        r = settings.rank
        self.A = torch.nn.Parameter(torch.zeros(r, in_features, dtype=dtype, device=device))
        self.B = torch.nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        # The TP-split one is marked so megatron-core counts it on every rank (grad norm) and
        # the replicated one once.
        split, dim = (self.B, 0) if parallel == "column" else (self.A, 1)
        set_tensor_model_parallel_attributes(split, is_parallel=True, dim=dim, stride=1)
        if self.sequence_parallel:  # the replicated factor sees s / TP tokens: sum it over TP
            replicated = self.A if parallel == "column" else self.B
            setattr(replicated, "sequence_parallel", True)
        if not allreduce:
            for p in (self.A, self.B):
                setattr(p, "allreduce", False)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` as the forward uses them: on a routed expert the replicated one's
        gradient is summed over the expert-TP group (module docstring)."""
        if self.expert_group is None:
            return self.A, self.B
        return _sum_replicated_grad(self.parallel, self.A, self.B, self.expert_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
            reduce_from_tensor_model_parallel_region,
            reduce_scatter_to_sequence_parallel_region,
        )

        if self.dropout is not None:
            if self.parallel == "row" or self.sequence_parallel:
                # This rank's slice of the input gets its own mask (megatron's TP-split RNG);
                # a replicated input gets the same mask on every TP rank (the default RNG).
                from megatron.core.tensor_parallel import get_cuda_rng_tracker

                with get_cuda_rng_tracker().fork():
                    x = self.dropout(x)
            else:
                x = self.dropout(x)
        a, b = self.factors()
        h = torch.nn.functional.linear(x, a)
        if self.expert_group is not None:
            pass  # the dispatcher moves an expert's tokens and sums its partial outputs
        elif self.parallel == "column":
            h = (gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True)
                 if self.sequence_parallel else copy_to_tensor_model_parallel_region(h))
        else:
            h = (reduce_scatter_to_sequence_parallel_region(h) if self.sequence_parallel
                 else reduce_from_tensor_model_parallel_region(h))
        return torch.nn.functional.linear(h, b) * self.scale


def _sum_replicated_grad(parallel: str, a: torch.Tensor, b: torch.Tensor, group
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with the replicated one (A of a column adapter, B of a row one) passed
    through megatron's ``copy_to_tensor_model_parallel_region`` over ``group``."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    if parallel == "column":
        return copy_to_tensor_model_parallel_region(a, group=group), b
    return a, copy_to_tensor_model_parallel_region(b, group=group)


def expert_update(adapters: list["LoRAAdapter"], x: torch.Tensor, offs: torch.Tensor,
                  grouped_linear) -> torch.Tensor:
    """The local experts' LoRA updates for rows of ``x`` sorted by expert (``offs``: cumulative
    rows per expert), as ``GroupedMMExperts`` computes its base: two grouped GEMMs,
    ``[T, in] x [E, r, in] -> [T, r]`` and ``[T, r] x [E, out, r] -> [T, out]``. The adapters
    are stacked (small: ``E * r * (in + out)``) and the replicated factor's gradient summed
    once for all experts. On CUDA the rank is zero-padded to a multiple of 8 (grouped GEMMs
    want 16-byte aligned rows; zero columns add nothing)."""
    first = adapters[0]
    a = torch.stack([ad.A for ad in adapters])
    b = torch.stack([ad.B for ad in adapters])
    if first.expert_group is not None:
        a, b = _sum_replicated_grad(first.parallel, a, b, first.expert_group)
    pad = (-a.shape[1]) % 8 if x.is_cuda else 0
    if pad:
        a = torch.nn.functional.pad(a, (0, 0, 0, pad))
        b = torch.nn.functional.pad(b, (0, pad))
    if first.dropout is not None:
        if first.parallel == "row":
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            with get_cuda_rng_tracker().fork():
                x = first.dropout(x)
        else:
            x = first.dropout(x)
    h = grouped_linear(x, a.to(x.dtype), offs)
    return grouped_linear(h, b.to(x.dtype), offs) * first.scale


def _add_update(module, args, kwargs, output, *, kind: BaseLinear):
    """Forward hook of a base linear: ``(W x, bias) -> (W x + lora(x), bias)``, with ``x``
    normalised first when the base normalises it before ``W`` (TE's fused norm + linear)."""
    x = args[0] if args else kwargs[kind.input_arg]
    if kind.normalises_input:
        x = fused_input_norm(module, x)
    out, bias = output
    return out + module.lora(x).to(out.dtype), bias


def target_module(layer, target: str) -> Optional[torch.nn.Module]:
    """The base linear ``target`` names in ``layer``; on a Mixture-of-Experts layer the MLP
    targets are its shared expert's linears here (``None`` without one; the routed experts'
    are :func:`iter_sites`'), as ``lora.split.layer_target_names`` names them."""
    parent = getattr(layer, PARENT[target])
    if PARENT[target] == "mlp" and hasattr(parent, "router"):
        parent = getattr(parent, "shared_experts", None)
        if parent is None:
            return None
    return getattr(parent, target)


@dataclasses.dataclass(frozen=True)
class AdapterSite:
    """One base linear that carries an adapter."""

    layer_number: int                   # global, 1-based (megatron-core's)
    target: str
    base: Any
    #: the global index of the routed expert it belongs to (``None``: not a routed expert)
    expert: Optional[int] = None
    #: the base's weight where ``base`` does not hold it (``GroupedMMExperts``' 3-D parameters)
    weight: Optional[torch.Tensor] = None


#: expert modules whose per-expert linears are ``local_experts.{e}.linear_fc1/2``
_PER_EXPERT_MODULES = ("SequentialMLP", "GroupedMMExperts")


def iter_sites(chunks: list, settings: LoRASettings) -> Iterator[AdapterSite]:
    """Every adapter site of the model chunks: the targets of each layer, then (MoE layers,
    ``settings.expert_targets``) each local routed expert's, with its global index from
    megatron-core's ``local_expert_indices``."""
    for chunk in chunks:
        for layer in unwrap_model(chunk).decoder.layers:
            for name in settings.targets:
                base = target_module(layer, name)
                if base is not None:
                    yield AdapterSite(layer.layer_number, name, base)
            mlp = getattr(layer, "mlp", None)
            if not settings.expert_targets or not hasattr(mlp, "router"):
                continue
            kind = type(mlp.experts).__name__
            if kind not in _PER_EXPERT_MODULES:
                raise LoRABaseError(
                    f"LoRA on the routed experts ({kind}): it computes all experts in one "
                    "Transformer Engine op on its own weights, so per-expert adapters cannot be "
                    "added; use --moe-experts-impl grouped_mm (or sequential), or "
                    "--moe-experts-freeze to adapt everything but the routed experts")
            grouped = getattr(mlp.experts, "expert_weight", None)
            for e, (index, expert) in enumerate(zip(mlp.local_expert_indices,
                                                    mlp.experts.local_experts)):
                for name in settings.expert_targets:
                    yield AdapterSite(layer.layer_number, name, getattr(expert, name), index,
                                      grouped(e, name) if grouped is not None else None)


def add_adapter(base: torch.nn.Module, target: str, settings: LoRASettings,
                expert: bool = False, weight: Optional[torch.Tensor] = None) -> "LoRAAdapter":
    """Give one base linear a zero-initialised ``lora`` child and the hook that adds its update;
    :class:`megatron.sft.lora.bases.LoRABaseError` if ``base`` cannot carry one (the message
    says why). ``expert``: ``base`` is a routed expert's linear (module docstring);
    ``weight``: its weight where ``base`` does not hold it (``GroupedMMExperts``)."""
    parallel = LORA_TARGETS[target]
    kind = recognise_base(base, target, parallel, expert=expert, weight=weight)
    weight = base.weight if weight is None else weight
    group = None
    if expert:
        from megatron.core import parallel_state

        group = parallel_state.get_expert_tensor_parallel_group()
    base.lora = LoRAAdapter(parallel, *adapter_shape(base, weight), settings, dtype=weight.dtype,
                            device=weight.device,
                            sequence_parallel=bool(getattr(base, "sequence_parallel", False)),
                            expert_group=group,
                            allreduce=bool(getattr(weight, "allreduce", True)))
    base.register_forward_hook(functools.partial(_add_update, kind=kind), with_kwargs=True)
    return base.lora


def attach_lora(chunks: list, settings: LoRASettings) -> int:
    """Freeze every parameter of ``chunks`` and add zero-initialised adapters to the targeted
    linears (call before DDP and the optimizer are built, so neither sees the base weights).
    Returns the number of adapter parameters on this rank. A model LoRA cannot wrap is refused
    (:class:`megatron.sft.lora.bases.LoRABaseError`) before anything is changed."""
    sites = list(iter_sites(chunks, settings))
    for chunk in chunks:
        for layer in unwrap_model(chunk).decoder.layers:
            for parent_name in sorted({PARENT[t] for t in settings.targets}):
                parent = type(getattr(layer, parent_name)).__name__
                if parent in BYPASSING_PARENTS:
                    raise LoRABaseError(f"LoRA on {parent_name} ({parent}): "
                                        f"{BYPASSING_PARENTS[parent]}")
    for site in sites:
        recognise_base(site.base, site.target, LORA_TARGETS[site.target],
                       expert=site.expert is not None, weight=site.weight)
    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad_(False)
    count = 0
    for site in sites:
        adapter = add_adapter(site.base, site.target, settings, expert=site.expert is not None,
                              weight=site.weight)
        count += sum(p.numel() for p in adapter.parameters())
    for chunk in chunks:
        embedding = getattr(unwrap_model(chunk), "embedding", None)
        if embedding is not None:
            embedding.register_forward_hook(_needs_grad)
    return count


def _needs_grad(module, args, output):
    """With a frozen embedding the first layer's input does not require grad, and activation
    recompute (an autograd Function over the layer) would then return outputs that do not
    either: no adapter would get a gradient. Mark the embedding output as requiring grad."""
    if not output.requires_grad:
        output.requires_grad_(True)
    return output


def adapter_parameters(chunks: list) -> list[torch.nn.Parameter]:
    return [p for c in chunks for n, p in unwrap_model(c).named_parameters() if ADAPTER_MARK in f".{n}"]


@torch.no_grad()
def init_adapters(chunks: list, settings: LoRASettings, seed: int, b_std: float = 0.0) -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5), as peft), B = 0, or
    B ~ N(0, b_std) when ``b_std > 0`` (tests: makes the adapter path count from step 0).

    Each adapter's full tensors are drawn from a generator seeded by (seed, global layer,
    target) and, on a routed expert, its global expert index, and then split like the base, so
    every TP/PP/EP layout trains the same model.
    """
    dims = parallel_dims()
    names = list(LORA_TARGETS)
    for site in iter_sites(chunks, settings):
        name, ad = site.target, site.base.lora
        key = f"{seed}/{site.layer_number}/{names.index(name)}"
        tp, rank = dims.layout.tp, dims.tp_rank
        if site.expert is not None:  # split over the expert-TP group
            from megatron.core import parallel_state

            key += f"/expert{site.expert}"
            tp = dims.layout.expert_tp
            rank = parallel_state.get_expert_tensor_parallel_rank()
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        column = LORA_TARGETS[name] == "column"
        r, in_full = ad.A.shape[0], ad.A.shape[1] * (1 if column else tp)
        out_full = ad.B.shape[0] * (tp if column else 1)
        bound = 1.0 / in_full ** 0.5
        a = torch.rand(r, in_full, generator=gen) * 2 * bound - bound
        b = (torch.randn(out_full, r, generator=gen) * b_std if b_std > 0
             else torch.zeros(out_full, r))
        if column:
            # fc1's rows are [gate_shard; up_shard] per rank; QKV's are in one fused order.
            b = (T.fuse_gate_up(*torch.chunk(b, 2, 0), tp)[rank] if name == "linear_fc1"
                 else T.split_tp(b, tp, 0)[rank])
        else:
            a = T.split_tp(a, tp, 1)[rank]
        ad.A.copy_(a)
        ad.B.copy_(b)


def load_adapters(chunks: list, iter_dir: Path, meta: CheckpointMetadata,
                  verify: bool = True) -> None:
    """Copy a LoRA run's saved adapters (``iter_dir``) into the attached ones of ``chunks``;
    every adapter must be there, and nothing else."""
    dims = parallel_dims()
    state = load_rank_state(iter_dir, meta.layout, dims.tp_rank, dims.pp_rank, dims.ep_rank,
                            mmap=True, verify=verify)
    for chunk, model in enumerate(chunks):
        saved = state.get(meta.layout.model_key(chunk), {})
        wanted = {n for n, _ in model.named_parameters() if is_adapter_name(n)}
        missing, unexpected = sorted(wanted - set(saved)), sorted(set(saved) - wanted)
        if missing or unexpected:
            raise CheckpointError(f"{iter_dir}: adapters do not fit this model: missing "
                                  f"{missing[:6]}, unexpected {unexpected[:6]}")
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n in wanted:
                params[n].copy_(saved[n])
