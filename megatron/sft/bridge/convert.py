"""HuggingFace safetensors directory -> Megatron-LM checkpoint split for TP x PP (x VPP)
(x EP for Mixture-of-Experts models).

Memory: tensors are read one at a time (positioned reads, no mmap) and each pipeline stage is
written and freed before the next, so peak memory is about one stage (all its TP ranks) plus one
source tensor, never a multiple of the model. With expert parallelism a stage's dense tensors
are built once and written into every EP rank's files, and each EP rank's experts are built,
written and freed in turn; routed experts are read in either HF form (one tensor per expert, or
fused ``[E, rows, cols]``, see ``expert_layout``), every one exactly once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from megatron.sft.bridge.architectures import shape_of
from megatron.sft.bridge.checkpoint_io import (
    CHECKPOINT_VERSION,
    CheckpointMetadata,
    check_output_dir,
    dtype_name,
    partial_iteration_dir,
    publish_iteration,
    read_json,
    save_rank_state,
    write_metadata,
    write_staged,
)
from megatron.sft.bridge.integrity import FileDigest, write_checksums
from megatron.sft.bridge.expert_layout import ExpertLayoutError, ExpertLayoutSource
from megatron.sft.bridge.fp8_source import Fp8ConfigError, dequantizing_source
from megatron.sft.bridge.reader import CoverageError
from megatron.sft.bridge.rules import ShardContext
from megatron.sft.bridge.mxfp4 import mxfp4_source
from megatron.sft.bridge.safetensors_io import SafetensorsSource
from megatron.sft.bridge.stage_mapping import build_stage, expected_hf_shapes
from megatron.sft.bridge.transforms import padded_vocab_size
from megatron.sft.runtime.disk import check_free_space
from megatron.sft.runtime.layout import ParallelLayout
from megatron.sft.runtime.locks import exclusive_output
from megatron.sft.runtime.path_overlap import check_output_separate


@dataclasses.dataclass
class ConvertOptions:
    layout: ParallelLayout = dataclasses.field(default_factory=ParallelLayout)
    #: Megatron pads the vocabulary to a multiple of this x TP (Megatron-LM's flag of that name).
    make_vocab_size_divisible_by: int = 128
    #: cast floating-point weights; ``None`` keeps the checkpoint's own dtype
    params_dtype: Optional[torch.dtype] = None
    iteration: int = 1
    force: bool = False
    progress: bool = True
    #: where notices go (mixed source dtypes)
    log: Callable[[str], None] = print


def load_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {hf_dir} is not a HuggingFace model directory")
    return read_json(path, "HF model config")


def check_coverage(source: "SafetensorsSource | ExpertLayoutSource",
                   expected: dict[str, tuple[int, ...]], spec, shape) -> None:
    """Every needed tensor present with its expected shape; every present tensor used (or known
    to be ignorable). All problems are reported at once."""
    needed = set(expected)
    missing = [n for n in expected if n not in source]
    unexpected = [
        n for n in source.names()
        if n not in needed and not spec.is_ignored(n) and not spec.is_mtp(n, shape)
        and not (shape.tie_word_embeddings and n == "lm_head.weight")
    ]
    wrong = [f"{n} has shape {tuple(source.meta(n).shape)}, expected {dims}"
             for n, dims in expected.items() if n in source and tuple(source.meta(n).shape) != dims]
    if missing or unexpected or wrong:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            lines.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}"
                         + (" ..." if len(unexpected) > 8 else ""))
        if wrong:
            lines.append(f"{len(wrong)} with the wrong shape: {'; '.join(wrong[:8])}"
                         + (" ..." if len(wrong) > 8 else ""))
        if missing and spec.fused_experts is not None and any(".experts." in n for n in missing):
            fused = sorted({f.fused for f in spec.fused_experts.tensors})
            lines.append(f"routed experts are read one tensor per expert or fused as "
                         f"{', '.join(fused)} ({{i}} = each MoE layer)")
        raise CoverageError(
            f"weights in {source.dir} do not match {spec.hf_architecture} with "
            f"{shape.num_layers} layers: " + "; ".join(lines)
        )


def _checkpoint_dtype(source, names: list[str], log) -> torch.dtype:
    """One dtype for the whole model (megatron-core builds it with one ``params_dtype``): the
    dtype most of the weights' bytes have; a checkpoint that mixes dtypes is told so."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for n in names:
        if source.dtype(n).is_floating_point:
            by_dtype.setdefault(source.dtype(n), []).append(n)
    if not by_dtype:
        return source.dtype(names[0])

    def nbytes(d):
        return sum(source.meta(n).numel() for n in by_dtype[d]) * torch.empty((), dtype=d).element_size()

    chosen = max(by_dtype, key=nbytes)
    if len(by_dtype) > 1:
        others = "; ".join(f"{len(v)} in {str(d)[6:]} (e.g. {v[0]})" for d, v in by_dtype.items()
                           if d != chosen)
        log(f"note: the HF weights mix dtypes: {len(by_dtype[chosen])} tensors in "
            f"{str(chosen)[6:]}, {others}; casting all to {str(chosen)[6:]} (the dtype of most of "
            "the weights). Set PARAMS_DTYPE=bf16|fp16|fp32 (--params-dtype) to choose")
    return chosen


def refuse_non_finite(name: str, t: torch.Tensor, fix: str) -> None:
    """A weight holding NaN or inf is never converted or exported: it names the tensor."""
    if not t.is_floating_point() or t.device.type == "meta":
        return
    # Fast path: a sum is finite only if every element is (NaN and inf propagate through
    # addition); one reduction is ~25x cheaper than building the isfinite mask of a bf16 tensor.
    # A non-finite sum (an element, or overflow of huge finite values) takes the exact check.
    try:
        if bool(torch.isfinite(t.sum())):
            return
    except (RuntimeError, TypeError):  # dtypes without a sum kernel (float8): exact check
        pass
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        nan, count = int(torch.isnan(t).sum()), int(bad.sum())
        raise ValueError(f"{name} holds non-finite values ({nan} NaN, {count - nan} inf of "
                         f"{t.numel()}); {fix}")


def open_source(hf_dir: Path, spec, shape, dtype: Optional[torch.dtype] = None
                ) -> "tuple[ExpertLayoutSource, dict]":
    """``hf_dir``'s tensors under the table's names (fused experts presented per expert, block
    FP8 weights dequantised to ``dtype``: ``fp8_source``) and the table's ``{name: shape}``,
    after checking every tensor is there once with its shape."""
    expected = expected_hf_shapes(spec, shape)
    experts = shape.moe.num_experts if shape.moe is not None else 0
    try:
        tensors = dequantizing_source(mxfp4_source(SafetensorsSource(hf_dir)), load_hf_config(hf_dir), dtype)
    except Fp8ConfigError as e:
        raise CoverageError(str(e)) from None
    try:
        source = ExpertLayoutSource(tensors, spec.fused_experts,
                                    shape.num_layers, experts, expected)
    except ExpertLayoutError as e:
        raise CoverageError(f"weights in {hf_dir}: {e}") from None
    check_coverage(source, expected, spec, shape)
    return source, expected


def save_stage(iter_dir: Path, pp_rank: int, iteration: int, meta: CheckpointMetadata,
               ranks: list[dict], ep_rank: int = 0, extra: Optional[dict] = None
               ) -> list[FileDigest]:
    """Write one pipeline stage's TP rank files (of EP rank ``ep_rank``: those TP ranks that
    have a file, ``ParallelLayout.file_tp_ranks``), releasing each rank's tensors once saved;
    returns their digests (for ``checksums.json``). ``extra`` entries go into every file."""
    digests = []
    written = meta.layout.file_tp_ranks(ep_rank)
    while ranks:
        tp_rank = len(ranks) - 1
        models = ranks.pop()
        if tp_rank in written:
            digests.append(save_rank_state(iter_dir, meta.layout, tp_rank, pp_rank, {
                "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                "sft_metadata": meta.to_dict(), **(extra or {}), **models}, ep_rank=ep_rank))
        del models
    return digests


def write_stage(iter_dir: Path, pp_rank: int, iteration: int, meta: CheckpointMetadata,
                get_hf, spec, shape, ctx: ShardContext, on_tensor=lambda name: None,
                extra: Optional[dict] = None) -> list[FileDigest]:
    """Build and write every file of pipeline stage ``pp_rank`` at ``meta.layout``: one per
    TP rank, times one per EP rank with expert parallelism (each with the stage's dense
    tensors, built once, and its own experts; with whole experts one per EP rank); returns
    their digests."""
    layout = meta.layout
    if layout.ep == 1:
        return save_stage(iter_dir, pp_rank, iteration, meta,
                          build_stage(get_hf, spec, shape, layout, pp_rank, ctx, on_tensor),
                          extra=extra)
    digests = []
    dense = build_stage(get_hf, spec, shape, layout, pp_rank, ctx, on_tensor, experts=False)
    for ep_rank in range(layout.ep):
        experts = build_stage(get_hf, spec, shape, layout, pp_rank, ctx, on_tensor, ep_rank,
                              dense=False)
        written = layout.file_tp_ranks(ep_rank)
        files = [{key: {**dense[tp][key], **experts[tp][key]} for key in dense[tp]}
                 if tp in written else {} for tp in range(layout.tp)]
        del experts
        digests += save_stage(iter_dir, pp_rank, iteration, meta, files, ep_rank, extra)
    return digests


def convert_hf_to_megatron(hf_dir: "str | Path", out_dir: "str | Path",
                           options: Optional[ConvertOptions] = None) -> CheckpointMetadata:
    opts = options or ConvertOptions()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = load_hf_config(hf_dir)
    spec, shape = shape_of(config)
    layout = opts.layout
    layout.validate(shape)
    layout.check_files()
    check_output_separate(out_dir, "--save-dir", {"--load-dir": hf_dir})
    with exclusive_output(out_dir, "conversion"):
        check_output_dir(out_dir, opts.force)
        return _convert_locked(hf_dir, out_dir, opts, config, spec, shape)


def _convert_locked(hf_dir: Path, out_dir: Path, opts: ConvertOptions, config: dict, spec,
                    shape) -> CheckpointMetadata:
    layout = opts.layout
    source, expected = open_source(hf_dir, spec, shape, opts.params_dtype)
    if getattr(source.source, "scales", None):
        opts.log(f"note: {len(source.source.scales)} block-FP8 weights are dequantised "
                 "(fp8 x weight_scale_inv per block, in fp32) and written in the run's dtype")
    required = list(expected)
    dtype = opts.params_dtype or _checkpoint_dtype(source, required, opts.log)
    ctx = ShardContext(shape, layout.tp,
                       padded_vocab_size(shape.vocab_size, opts.make_vocab_size_divisible_by, layout.tp),
                       expert_tp_size=layout.expert_tp)
    needed = sum(int(torch.Size(source.meta(n).shape).numel()) for n in required) \
        * torch.empty((), dtype=dtype).element_size()
    check_free_space(out_dir.parent, needed, f"the converted checkpoint {out_dir.name}")

    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        want = torch.float32 if spec.keeps_fp32(name) else dtype
        return t.to(want) if t.is_floating_point() and t.dtype != want else t

    mtp = sorted({".".join(n.split(".")[:3]) for n in source.names() if spec.is_mtp(n, shape)})
    if mtp:
        opts.log(f"note: the multi-token-prediction layer(s) {', '.join(m + '.*' for m in mtp)} "
                 "are not converted (MTP is not trained here); export puts them back unchanged "
                 "from the HF reference directory")

    def finite(name: str, t: torch.Tensor) -> torch.Tensor:
        refuse_non_finite(name, t, f"the HF checkpoint in {hf_dir} is damaged: download or "
                                   "copy it again")
        return t

    meta = CheckpointMetadata(
        architecture=spec.hf_architecture,
        hf_config=config,
        layout=layout,
        make_vocab_size_divisible_by=opts.make_vocab_size_divisible_by,
        padded_vocab_size=ctx.padded_vocab_size,
        params_dtype=dtype_name(dtype),
        producer="convert",
    )
    total = len(required) + (1 if shape.tie_word_embeddings and layout.pp > 1 else 0)
    bar = tqdm(total=total, unit="tensor", desc=f"convert {layout.describe().replace(' ', '')}",
               disable=not opts.progress)

    def write(staging: Path) -> None:
        partial = partial_iteration_dir(staging, opts.iteration)
        partial.mkdir(parents=True)
        digests = []
        for pp_rank in range(layout.pp):
            # One stage in memory at a time: write_stage's locals die with it.
            digests += write_stage(partial, pp_rank, opts.iteration, meta,
                                   lambda n: finite(n, cast(n, source.read(n))), spec, shape, ctx,
                                   on_tensor=lambda n: bar.update(1))
        write_metadata(partial, meta)
        write_checksums(partial, digests)
        publish_iteration(staging, opts.iteration)

    try:
        write_staged(out_dir, write)
    finally:
        bar.close()
    return meta
