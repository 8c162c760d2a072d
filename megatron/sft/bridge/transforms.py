"""Pure tensor transforms between HuggingFace and Megatron weight layouts.

Every function here works on plain tensors, including ``meta`` tensors: the converter first runs
the whole conversion on ``meta`` copies of the source headers to validate names and shapes before
a single byte is written.

Megatron's fused QKV weight groups rows *per query group*: for query group ``g`` it holds that
group's ``heads_per_group`` query heads, then its key head, then its value head. Tensor parallelism
splits query groups across ranks, so the fused tensor chunks evenly along dim 0. Example with
4 query heads, 2 KV heads (groups), head_dim 1::

    q rows [q0 q1 q2 q3], k rows [k0 k1], v rows [v0 v1]
    fused  [q0 q1 k0 v0 | q2 q3 k1 v1]        TP=2 -> rank0 gets the left half

Megatron's gated ``linear_fc1`` holds ``[gate; up]`` *per TP rank*, so fusion happens after the
split::

    gate [g0 g1 g2 g3], up [u0 u1 u2 u3], TP=2 -> rank0 [g0 g1 u0 u1], rank1 [g2 g3 u2 u3]
"""

from __future__ import annotations

import torch


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron pads the vocabulary so each TP rank gets an equal, aligned slice.

    >>> padded_vocab_size(151936, 128, 2)
    152064
    >>> padded_vocab_size(100, 8, 1)
    104
    """
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def pad_vocab(weight: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Append zero rows; padded ids are never fed in and their logits are masked by the loss."""
    extra = padded_size - weight.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad a vocabulary of {weight.shape[0]} rows down to {padded_size}")
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros((extra,) + tuple(weight.shape[1:]))], dim=0)


def split_tp(tensor: torch.Tensor, tp_size: int, dim: int) -> list[torch.Tensor]:
    """Even TP split along ``dim``."""
    if tensor.shape[dim] % tp_size:
        raise ValueError(
            f"dimension {dim} of a tensor of shape {tuple(tensor.shape)} is not divisible by "
            f"tensor-parallel size {tp_size}"
        )
    if tp_size == 1:
        return [tensor.contiguous()]
    # Each shard on a storage of its own, so ``torch.save`` writes only the shard: row blocks of
    # a contiguous tensor borrow its bytes (no copy; the full tensor lives while a shard does),
    # column blocks are copied.
    return [own_storage(t) for t in torch.chunk(tensor, tp_size, dim=dim)]


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t.clone()`` as ``torch.save`` sees it (a storage holding exactly ``t``), without a copy
    for a contiguous CPU tensor: a tensor on a storage that borrows ``t``'s bytes and keeps them
    alive. Rows 2..4 of an ``[8, 3]`` tensor -> a ``[2, 3]`` tensor whose storage is those 6
    elements, sharing memory with the original."""
    if (type(t) is not torch.Tensor or t.device.type != "cpu" or t.requires_grad
            or not t.is_contiguous() or t.numel() == 0):
        return t.clone(memory_format=torch.contiguous_format)
    raw = t.reshape(-1).view(torch.uint8).numpy()  # shares t's memory
    return torch.frombuffer(raw, dtype=torch.uint8).view(t.dtype).view(t.shape)


def merge_tp(shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.cat(list(shards), dim=dim) if len(shards) > 1 else shards[0]


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int
) -> torch.Tensor:
    """HF separate q/k/v (weights ``[heads*d, hidden]`` or biases ``[heads*d]``) -> fused rows."""
    groups = num_query_groups
    if q.shape[0] % groups or k.shape[0] % groups or v.shape[0] % groups:
        raise ValueError(
            f"q/k/v rows {q.shape[0]}/{k.shape[0]}/{v.shape[0]} are not divisible by "
            f"{groups} query groups"
        )
    tail = tuple(q.shape[1:])
    parts = [t.reshape((groups, t.shape[0] // groups) + tail) for t in (q, k, v)]
    fused = torch.cat(parts, dim=1)
    return fused.reshape((-1,) + tail)


def unfuse_qkv(
    fused: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv` for the full (all TP ranks merged) tensor."""
    groups = num_query_groups
    per_group_q = num_heads // groups
    rows_per_group = (per_group_q + 2) * head_dim
    if fused.shape[0] != groups * rows_per_group:
        raise ValueError(
            f"fused QKV has {fused.shape[0]} rows; expected {groups} groups x "
            f"({per_group_q} q + 1 k + 1 v heads) x head_dim {head_dim} = {groups * rows_per_group}"
        )
    tail = tuple(fused.shape[1:])
    grouped = fused.reshape((groups, per_group_q + 2, head_dim) + tail)
    q = grouped[:, :per_group_q].reshape((num_heads * head_dim,) + tail)
    k = grouped[:, per_group_q].reshape((groups * head_dim,) + tail)
    v = grouped[:, per_group_q + 1].reshape((groups * head_dim,) + tail)
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor, tp_size: int) -> list[torch.Tensor]:
    """Per-rank ``[gate_shard; up_shard]`` (see module docstring)."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} shapes differ")
    gates, ups = split_tp(gate, tp_size, 0), split_tp(up, tp_size, 0)
    return [torch.cat([g, u], dim=0) for g, u in zip(gates, ups)]


def unfuse_gate_up(shards: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    gates, ups = [], []
    for shard in shards:
        if shard.shape[0] % 2:
            raise ValueError(f"linear_fc1 shard with odd row count {shard.shape[0]} is not gated")
        g, u = torch.chunk(shard, 2, dim=0)
        gates.append(g)
        ups.append(u)
    return merge_tp(gates, 0).contiguous(), merge_tp(ups, 0).contiguous()
