"""Every parallel size in one pure object, :class:`ParallelLayout`, and the arithmetic that
follows from it (pure: no process group, no megatron-core).

Training, checkpoint metadata, conversion, resharding and the megatron-core configs all read
this object; :mod:`megatron.sft.runtime.parallel_dims` answers the per-rank questions (which
rank writes, logs, sums the loss) once the process groups exist.

Sizes, as megatron-core names them:

====  ==============================  =====================================================
tp    tensor_model_parallel_size      heads and FFN split over ranks
pp    pipeline_model_parallel_size    layers split into stages
vpp   virtual_pipeline_model_...      model chunks per pipeline rank (``None``: one, plain)
cp    context_parallel_size           each sequence split over ranks (weights replicated)
ep    expert_model_parallel_size      MoE experts split over ranks (carved out of DP x CP)
etp   expert_tensor_parallel_size     TP inside each expert (``None``: same as ``tp``)
fsdp  data_parallel_sharding_strategy what Megatron-FSDP shards over DP (``None``: no FSDP)
====  ==============================  =====================================================

``world = tp x pp x cp x dp`` for the dense part, and ``world = etp x ep x pp x edp`` for the
experts. Checkpoint files are per (tp, pp[, ep]) rank, so ``cp`` (like ``dp``) never changes
them: :meth:`ParallelLayout.for_checkpoint` is the layout a checkpoint records. Nor does
``fsdp``: a run under Megatron-FSDP saves the same per-(tp, pp) files, gathered at save time, and
its process groups are those of the same layout without it (:meth:`ParallelLayout.to_megatron`).
megatron-core 0.16's Megatron-FSDP builds its device mesh over DP x CP x TP only, so it refuses
pipeline parallelism (an einops error deep in ``FullyShardedDataParallel``): checked here first.

Megatron-LM's file layout: one ``model_optim_rng.pt`` per rank under ``iter_NNNNNNN/mp_rank_TT``
(PP = 1), ``mp_rank_TT_PPP`` (PP > 1), plus ``_EEE`` with EP > 1. With virtual pipeline stages a
rank's file holds ``model0, model1, ...`` (one per chunk) instead of ``model``.

Layer assignment matches megatron-core's ``get_transformer_layer_offset`` for even splits.
Example, 8 layers, PP=2, VPP=2 (chunks of 2 layers)::

    pp0: chunk0 -> layers [0, 1]   chunk1 -> layers [4, 5]
    pp1: chunk0 -> layers [2, 3]   chunk1 -> layers [6, 7]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol


class LayoutError(ValueError):
    """A parallel layout that cannot shard this model or fill this world."""


class ShapeLike(Protocol):
    """What validation reads of a model (``bridge.model_shape.ModelShape`` has it all)."""

    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int

    def dim(self, symbol: str) -> int: ...


@dataclasses.dataclass(frozen=True)
class Spelling:
    """How messages name sizes for their audience: the converter tools' ``TP=3`` or the
    trainer's ``--tensor-model-parallel-size 3``. Same checks, same facts, the user's words."""

    tp: str
    pp: str
    cp: str
    ep: str
    etp: str
    #: the layer-count fault: ``{stages}`` spelled sizes, ``{layers}`` the model's layers
    layers: str
    #: virtual stages asked for without a pipeline
    vpp_needs_pp: str
    #: layers per virtual stage that do not divide the model (``{k}``, ``{pp}``, ``{layers}``)
    virtual_stage: str
    #: the row length and sequence parallelism, as the audience sets them
    seq: str = "SEQ_LEN={}"
    sp: str = "SP"
    #: Megatron-FSDP with sharding strategy ``{}``
    fsdp: str = "FSDP={}"
    #: Megatron-FSDP asked for with a pipeline (``{fsdp}``, ``{pp}``: spelled sizes)
    fsdp_needs_no_pp: str = ("{fsdp} with {pp}: megatron-core's Megatron-FSDP does not support "
                             "pipeline parallelism; use PP=1 (FSDP shards the layers instead) "
                             "or drop FSDP")

    def size(self, dim: str, value: Any) -> str:
        return getattr(self, dim).format(value)


SHORT = Spelling(
    tp="TP={}", pp="PP={}", cp="CP={}", ep="EP={}", etp="ETP={}",
    layers="{stages} does not divide num_hidden_layers={layers}",
    vpp_needs_pp="virtual pipeline stages need PP >= 2",
    virtual_stage="{k} layers per virtual pipeline stage x PP {pp} does not divide the model's "
                  "{layers} layers")
FLAGS = Spelling(
    tp="--tensor-model-parallel-size {}", pp="--pipeline-model-parallel-size {}",
    cp="--context-parallel-size {}", ep="--expert-model-parallel-size {}",
    etp="--expert-tensor-parallel-size {}",
    layers="num_layers {layers} is not divisible by {stages}",
    vpp_needs_pp="--num-layers-per-virtual-pipeline-stage needs "
                 "--pipeline-model-parallel-size >= 2",
    virtual_stage="num_layers {layers} is not divisible by --pipeline-model-parallel-size {pp} "
                  "x --num-layers-per-virtual-pipeline-stage {k}",
    seq="--seq-length {}", sp="--sequence-parallel",
    fsdp="--use-megatron-fsdp --data-parallel-sharding-strategy {}",
    fsdp_needs_no_pp="{fsdp} with {pp}: megatron-core's Megatron-FSDP does not support "
                     "pipeline parallelism (its device mesh spans data, context and tensor "
                     "parallel ranks only); use --pipeline-model-parallel-size 1 (FSDP shards "
                     "the layers instead), or drop --use-megatron-fsdp")

#: Megatron-FSDP's ``data_parallel_sharding_strategy`` values (ZeRO-0 .. ZeRO-3)
FSDP_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    #: number of virtual pipeline chunks per pipeline rank (``None`` = no interleaving)
    vpp: Optional[int] = None
    cp: int = 1
    ep: int = 1
    #: tensor parallelism inside experts; ``None`` = ``tp`` (megatron-core's default)
    etp: Optional[int] = None
    #: Megatron-FSDP's sharding strategy (one of ``FSDP_STRATEGIES``); ``None`` = no FSDP
    fsdp: Optional[str] = None

    # ------------------------------------------------------------------ sizes
    @property
    def chunks(self) -> int:
        return self.vpp or 1

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one replica of the dense weights and one sequence: TP x PP x CP."""
        return self.tp * self.pp * self.cp

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def min_world_size(self) -> int:
        """The fewest ranks that run this layout: a multiple of TP x PP x CP (the dense grid)
        and of ETP x EP x PP (experts, carved out of data parallelism). TP2 x EP2 -> 4,
        TP1 x EP2 -> 2, TP2 x PP2 -> 4."""
        import math

        return math.lcm(self.model_parallel_size, self.expert_tp * self.ep * self.pp)

    def describe(self) -> str:
        """``TP2 PP1``, ``TP1 PP2 VPP2``, ``TP2 PP1 CP2 EP4``: how messages name a layout."""
        text = f"TP{self.tp} PP{self.pp}" + (f" VPP{self.vpp}" if self.vpp else "")
        for name, value, default in (("CP", self.cp, 1), ("EP", self.ep, 1),
                                     ("ETP", self.etp, None)):
            if value != default:
                text += f" {name}{value}"
        return text + (f" FSDP({self.fsdp})" if self.fsdp else "")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_flags(cls, tp: int = 1, pp: int = 1, layers_per_virtual_stage: Optional[int] = None,
                   num_layers: Optional[int] = None, *, cp: int = 1, ep: int = 1,
                   etp: Optional[int] = None, fsdp: Optional[str] = None,
                   spelling: Spelling = SHORT) -> "ParallelLayout":
        """Megatron-LM's flags -> a layout; ``--num-layers-per-virtual-pipeline-stage`` becomes
        chunks per pipeline rank (one chunk per rank is plain, non-interleaved PP).

        >>> ParallelLayout.from_flags(1, 2, 2, num_layers=8).vpp
        2
        >>> ParallelLayout.from_flags(1, 2, 4, num_layers=8).vpp is None
        True
        """
        return cls(tp, pp, virtual_stages(num_layers, pp, layers_per_virtual_stage, spelling),
                   cp, ep, etp, fsdp)

    def for_checkpoint(self) -> "ParallelLayout":
        """What decides a checkpoint's files: CP ranks hold the same weights, like DP ranks, and
        FSDP saves gathered weights."""
        return dataclasses.replace(self, cp=1, fsdp=None)

    def to_megatron(self) -> dict[str, Any]:
        """megatron-core's names, as ``initialize_model_parallel`` and ``TransformerConfig``
        take them."""
        return dict(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                    virtual_pipeline_model_parallel_size=self.vpp,
                    context_parallel_size=self.cp, expert_model_parallel_size=self.ep,
                    expert_tensor_parallel_size=self.etp)

    def to_metadata(self) -> dict[str, Any]:
        """The keys ``sft_metadata.json`` stores (Megatron-LM's argument names)."""
        d = self.for_checkpoint().to_megatron()
        del d["context_parallel_size"]
        return d

    @classmethod
    def from_metadata(cls, d: dict[str, Any]) -> "ParallelLayout":
        """Inverse of :meth:`to_metadata`; checkpoints from before expert parallelism have
        no expert keys (EP 1)."""
        return cls(int(d["tensor_model_parallel_size"]), int(d["pipeline_model_parallel_size"]),
                   d.get("virtual_pipeline_model_parallel_size"), 1,
                   int(d.get("expert_model_parallel_size") or 1),
                   d.get("expert_tensor_parallel_size"))

    # ------------------------------------------------------------------ validation
    def problems(self, shape: Optional[ShapeLike] = None, world_size: Optional[int] = None,
                 spelling: Spelling = SHORT, num_layers: Optional[int] = None, *,
                 seq_length: Optional[int] = None, sequence_parallel: bool = False,
                 attention: Optional[Callable[[int], Optional[str]]] = None) -> list[str]:
        """Every reason this layout cannot run ``shape`` on ``world_size`` ranks (``None``: not
        checked; ``num_layers`` alone checks only the pipeline split), in the words of
        ``spelling``. ``seq_length``: rows of that length must cut into ``2·CP`` chunks (x TP
        with ``sequence_parallel``); ``attention(cp)``: why the run's attention backend cannot
        do this CP on this device (``AttentionBackendSpec.check``), or ``None``."""
        s = spelling
        sizes = {"tp": self.tp, "pp": self.pp, "cp": self.cp, "ep": self.ep,
                 "etp": self.expert_tp}
        bad = [f"{s.size(k, v)}" for k, v in sizes.items()
               if v < 1 and (k != "etp" or self.etp is not None)]
        if self.vpp is not None and self.vpp < 1:
            bad.append(f"VPP={self.vpp}")
        if bad:
            return [f"sizes must be >= 1 (got {', '.join(bad)})"]
        out = []
        if world_size is not None:
            dense = [s.size(d, sizes[d]) for d in ("tp", "pp", "cp") if d in ("tp", "pp")
                     or sizes[d] != 1]
            if world_size % self.model_parallel_size:
                out.append(f"world size {world_size} is not divisible by {' x '.join(dense)}; "
                           f"launch a multiple of {self.model_parallel_size} processes")
            experts = self.expert_tp * self.ep * self.pp
            if self.ep > 1 and world_size % experts:
                out.append(f"world size {world_size} is not divisible by "
                           f"{s.size('etp', self.expert_tp)} x {s.size('ep', self.ep)} x "
                           f"{s.size('pp', self.pp)}; launch a multiple of {experts} processes")
        if self.vpp is not None and self.vpp > 1 and self.pp < 2:
            out.append(s.vpp_needs_pp)
        if seq_length is not None:
            out += self.sequence_problems(seq_length, sequence_parallel, s)
        if attention is not None and self.cp > 1:
            reason = attention(self.cp)
            if reason:
                out.append(reason)
        if self.fsdp is not None:
            if self.fsdp not in FSDP_STRATEGIES:
                out.append(f"{s.size('fsdp', self.fsdp)}: use one of {', '.join(FSDP_STRATEGIES)}")
            elif self.pp > 1:
                out.append(s.fsdp_needs_no_pp.format(fsdp=s.size("fsdp", self.fsdp),
                                                     pp=s.size("pp", self.pp)))
            for dim in ("cp", "ep"):
                if sizes[dim] > 1:  # our rank-file gather and optimizer shards assume DP only
                    out.append(f"{s.size('fsdp', self.fsdp)} with {s.size(dim, sizes[dim])}: "
                               "fully sharded data parallel is proven here with TP and DP "
                               f"only; drop {s.size(dim, sizes[dim])} or use the distributed "
                               "optimizer instead of FSDP")
        layers = shape.num_layers if shape is not None else num_layers
        stages = self.pp * self.chunks
        if layers is not None and layers % stages:
            what = s.size("pp", self.pp) + (f" x VPP={self.vpp}" if self.vpp else "")
            out.append(s.layers.format(stages=what, layers=layers))
        if shape is None:
            return out
        if shape.num_attention_heads % self.tp:
            out.append(f"{s.size('tp', self.tp)} does not divide "
                       f"num_attention_heads={shape.num_attention_heads}")
        ng = shape.num_query_groups
        # TP may exceed the KV heads when it is a multiple of them: megatron-core then gives
        # each KV head to TP/ng ranks (the fused QKV rows are split as usual).
        if ng % self.tp and self.tp % ng:
            out.append(f"{s.size('tp', self.tp)} and num_key_value_heads={ng}: one must divide "
                       "the other")
        elif self.tp > ng and self._qkv_rows(shape) % self.tp:
            out.append(f"{s.size('tp', self.tp)} does not divide the fused QKV rows "
                       f"{self._qkv_rows(shape)}")
        if shape.ffn_hidden_size % self.tp:
            out.append(f"{s.size('tp', self.tp)} does not divide "
                       f"intermediate_size={shape.ffn_hidden_size}")
        moe = getattr(shape, "moe", None)
        if moe is not None:
            if moe.num_experts % self.ep:
                out.append(f"{s.size('ep', self.ep)} does not divide "
                           f"num_experts={moe.num_experts}")
            if moe.ffn_hidden_size % self.expert_tp:
                out.append(f"{s.size('etp', self.expert_tp)} does not divide the experts' "
                           f"intermediate size {moe.ffn_hidden_size}")
        elif self.ep > 1:
            out.append(f"{s.size('ep', self.ep)}: this model has no experts; use "
                       f"{s.size('ep', 1)}")
        return out

    def sequence_problems(self, seq_length: int, sequence_parallel: bool = False,
                          spelling: Spelling = SHORT) -> list[str]:
        """Rows must cut into ``2·CP`` equal chunks (the CP split, see ``cp_split``), and each
        rank's ``s / CP`` tokens into TP equal parts with sequence parallelism.

        >>> ParallelLayout(tp=2, cp=2).sequence_problems(100, True, FLAGS)[0][:77]
        '--seq-length 100 is not divisible by 2 x --context-parallel-size 2 x --tensor'
        """
        s = spelling
        sp = sequence_parallel and self.tp > 1
        multiple = (2 * self.cp if self.cp > 1 else 1) * (self.tp if sp else 1)
        if seq_length % multiple == 0:
            return []
        parts = ([f"2 x {s.size('cp', self.cp)}"] if self.cp > 1 else []) + \
            ([f"{s.size('tp', self.tp)} ({s.sp})"] if sp else [])
        why = " and ".join(w for w, on in (("each row is cut into 2 x CP chunks", self.cp > 1),
                                           (f"{s.sp} splits each rank's tokens over TP", sp))
                           if on)
        lower, upper = seq_length // multiple * multiple, (seq_length // multiple + 1) * multiple
        return [f"{s.size('seq', seq_length)} is not divisible by {' x '.join(parts)} = "
                f"{multiple} ({why}); use {s.size('seq', upper)}"
                + (f" or {s.size('seq', lower)}" if lower else "")]

    def validate(self, shape: Optional[ShapeLike] = None, world_size: Optional[int] = None,
                 spelling: Spelling = SHORT, num_layers: Optional[int] = None,
                 **sequence: Any) -> None:
        """Raise :class:`LayoutError` with the numbers and a fix when the split is impossible;
        with a model ``shape`` the message lists the sizes that would work. ``sequence``:
        :meth:`problems`' ``seq_length``, ``sequence_parallel``, ``attention``."""
        problems = self.problems(shape, world_size, spelling, num_layers, **sequence)
        if not problems:
            return
        if shape is None:
            raise LayoutError(problems[0] if len(problems) == 1 else "; ".join(problems))
        raise LayoutError("cannot shard this model: " + "; ".join(problems)
                          + f". Valid TP sizes: {valid_tp_sizes(shape)}; valid PP (x VPP) "
                            f"sizes: {[d for d in range(1, shape.num_layers + 1) if shape.num_layers % d == 0]}")

    def check_files(self, spelling: Spelling = SHORT) -> None:
        """What our checkpoint files can hold, beyond what megatron-core can run: one file per
        (TP, PP, EP) rank holds that TP rank's shard of the dense weights *and* of its experts,
        so the experts must be split over TP like the rest. With another expert TP size the
        ranks of one (TP, PP, EP) coordinate would hold different expert shards (or a needed
        coordinate no rank at all)."""
        if self.etp is not None and self.etp != self.tp:
            raise LayoutError(
                f"{spelling.size('etp', self.etp)} with {spelling.size('tp', self.tp)}: checkpoint "
                "files are per (TP, PP, EP) rank, so the experts are split over TP like the "
                f"other weights; use {spelling.size('etp', self.tp)} or leave it unset")

    @staticmethod
    def _qkv_rows(shape: ShapeLike) -> int:
        return shape.dim("q") + 2 * shape.dim("kv")

    def check_same_files(self, checkpoint: "ParallelLayout") -> None:
        """A run loads per-rank files only at the layout they were written for."""
        mine, theirs = self.for_checkpoint(), checkpoint.for_checkpoint()
        if mine != theirs:
            raise LayoutError(
                f"checkpoint is split {theirs.describe_files()} but this run uses "
                f"{mine.describe_files()}; run with the checkpoint's sizes or re-split it "
                "with scripts/checkpoints/reshard_checkpoint.sh")

    def describe_files(self) -> str:
        """``TP=2 PP=1 VPP=None`` (plus ``EP=`` when experts are split): the sizes that name a
        checkpoint's rank files."""
        text = f"TP={self.tp} PP={self.pp} VPP={self.vpp}"
        if self.ep != 1 or self.etp is not None:
            text += f" EP={self.ep} ETP={self.expert_tp}"
        return text

    # ------------------------------------------------------------------ layers and files
    def layers_per_chunk(self, shape: ShapeLike) -> int:
        return shape.num_layers // (self.pp * self.chunks)

    def chunk_layers(self, shape: ShapeLike, pp_rank: int, chunk: int) -> range:
        """Global layer indices held by ``(pp_rank, chunk)``."""
        n = self.layers_per_chunk(shape)
        start = chunk * (shape.num_layers // self.chunks) + pp_rank * n
        return range(start, start + n)

    def local_experts(self, shape: ShapeLike, ep_rank: int) -> range:
        """Global indices of the routed experts expert-parallel rank ``ep_rank`` holds
        (megatron-core gives each EP rank a contiguous block): 8 experts, EP 2 -> rank 1
        holds ``range(4, 8)``; a dense model has none."""
        moe = getattr(shape, "moe", None)
        if moe is None:
            return range(0)
        n = moe.num_experts // self.ep
        return range(ep_rank * n, (ep_rank + 1) * n)

    def has_embedding(self, pp_rank: int, chunk: int) -> bool:
        return pp_rank == 0 and chunk == 0

    def has_output(self, pp_rank: int, chunk: int) -> bool:
        return pp_rank == self.pp - 1 and chunk == self.chunks - 1

    def model_key(self, chunk: int) -> str:
        """State-dict key of a chunk inside ``model_optim_rng.pt``."""
        return "model" if self.vpp is None else f"model{chunk}"

    def rank_dir_name(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> str:
        """``mp_rank_01`` (PP=1), ``mp_rank_01_002`` (PP>1), ``+ _003`` (EP>1), as Megatron-LM
        names them."""
        return rank_dir_name(tp_rank, pp_rank, self.pp, ep_rank if self.ep > 1 else None)

    def file_ranks(self) -> list[tuple[int, int, int]]:
        """Every ``(tp_rank, pp_rank, ep_rank)`` that has a file, pipeline stage by stage."""
        return [(t, p, e) for p in range(self.pp) for e in range(self.ep)
                for t in range(self.tp)]


def microbatch_rows(iteration: int, global_batch: int, micro_batch: int, dp_rank: int,
                    dp_size: int) -> list[list[int]]:
    """Dataset rows of each micro-batch data-parallel rank ``dp_rank`` runs at ``iteration``.

    The global batch ``iteration`` is rows ``[iteration*G, (iteration+1)*G)``; DP rank ``r``
    takes the ``r``-th contiguous ``G/dp`` of them. Example: G=4, m=1, dp=2, iteration 1 ->
    rank 0 ``[[4], [5]]``, rank 1 ``[[6], [7]]``. Resuming at an iteration therefore resumes the
    exact data position.
    """
    return rows_from(iteration * global_batch, global_batch, micro_batch, dp_rank, dp_size)


def rows_from(first_row: int, global_batch: int, micro_batch: int, dp_rank: int,
              dp_size: int) -> list[list[int]]:
    """:func:`microbatch_rows` of the global batch that starts at dataset row ``first_row`` (a
    resumed run's data position, which a changed global batch size keeps).

    >>> rows_from(6, 2, 1, 1, 2)
    [[7]]
    """
    per_rank = global_batch // dp_size
    base = first_row + dp_rank * per_rank
    return [list(range(base + j * micro_batch, base + (j + 1) * micro_batch))
            for j in range(per_rank // micro_batch)]


def valid_tp_sizes(shape: ShapeLike) -> list[int]:
    ng, heads = shape.num_query_groups, shape.num_attention_heads
    qkv = shape.dim("q") + 2 * shape.dim("kv")
    return [d for d in range(1, heads + 1)
            if (ng % d == 0 or d % ng == 0) and heads % d == 0
            and shape.ffn_hidden_size % d == 0 and (d <= ng or qkv % d == 0)]


def virtual_stages(num_layers: Optional[int], pp: int, layers_per_virtual_stage: Optional[int],
                   spelling: Spelling = SHORT) -> Optional[int]:
    """Megatron-LM's ``--num-layers-per-virtual-pipeline-stage`` -> chunks per pipeline rank
    (``None`` without interleaving, or while ``num_layers`` is not known yet).

    >>> virtual_stages(8, 2, 2)
    2
    >>> virtual_stages(8, 2, 4) is None
    True
    """
    if not layers_per_virtual_stage:
        return None
    if pp < 2:
        raise LayoutError(spelling.vpp_needs_pp)
    if num_layers is None:
        return None  # checked again once the model's layers are known
    if num_layers % (pp * layers_per_virtual_stage):
        raise LayoutError(spelling.virtual_stage.format(k=layers_per_virtual_stage, pp=pp,
                                                        layers=num_layers))
    chunks = num_layers // (pp * layers_per_virtual_stage)
    return chunks if chunks > 1 else None  # one chunk per rank is plain (non-interleaved) PP


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: Optional[int] = None) -> str:
    """``mp_rank_01`` (PP=1) or ``mp_rank_01_002`` (PP>1), plus ``_EEE`` for an expert-parallel
    rank, as Megatron-LM names them."""
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep_rank is None else f"{name}_{ep_rank:03d}"


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"
