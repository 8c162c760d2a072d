"""Reshard any checkpoint, and keep a LoRA run a LoRA run: adapters re-split for another
TP x PP (x VPP), pointing at a base checkpoint at that layout.

A LoRA run's adapters fit exactly one base (its ``lora.json``), and a run and its base must
share a layout (``check_base``), so both move. The adapters go through the layout-free PEFT
form, the way weights go through HF tensors: shards -> ``{hf_module: (lora_A, lora_B)}`` ->
shards at the target TP (:mod:`megatron.sft.lora.split`). The base at the target layout is either

- the run's base resharded into ``OUT/base`` (the default; ``OUT`` is then self-contained), or
- a checkpoint the user already has at that layout (``--lora-base``, e.g. the HF model
  converted at TP4), accepted only when it holds the same model, tensor for tensor::

    OUT/
      latest_checkpointed_iteration.txt
      iter_0000040/  lora.json  sft_metadata.json  mp_rank_TT[_PPP]/model_optim_rng.pt (adapters)
      base/          (default only) the base at the target layout, at its own iteration

No optimizer state is written (it is layout-specific): ``--load OUT --lora-rank R ...`` loads
the adapters and starts a fresh optimizer. ``merge_lora`` instead writes the full model with
the adapters merged (what ``merge_and_export.sh`` exports).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from megatron.sft.bridge.checkpoint_io import (
    CheckpointMetadata,
    check_output_dir,
    partial_iteration_dir,
    publish_iteration,
    read_metadata,
    write_metadata,
    write_staged,
)
from megatron.sft.bridge.convert import save_stage
from megatron.sft.bridge.integrity import write_checksums
from megatron.sft.bridge.model_shape import ModelShape
from megatron.sft.bridge.reader import CheckpointReader
from megatron.sft.bridge.reshard import reshard_checkpoint
from megatron.sft.bridge.reshard import write_resharded
from megatron.sft.lora.merge import LoRARunReader, open_checkpoint
from megatron.sft.lora.peft_export import PeftAdapters, read_run_adapters
from megatron.sft.lora.run_format import (
    LORA_FILE,
    LoRACheckpointInfo,
    base_fingerprint,
    check_base,
    write_lora_info,
)
from megatron.sft.lora.split import adapter_from_hf, layer_target_names
from megatron.sft.runtime.layout import ParallelLayout
from megatron.sft.runtime.locks import exclusive_output
from megatron.sft.runtime.path_overlap import check_output_separate

#: where a LoRA run's resharded base goes inside the output (default mode)
LORA_BASE_SUBDIR = "base"


def reshard_any(ckpt_dir: "str | Path", out_dir: "str | Path", target: ParallelLayout,
                       iteration: Optional[int] = None, force: bool = False,
                       progress: bool = True, lora_base: "str | Path | None" = None,
                       merge_lora: bool = False, verify: bool = True) -> CheckpointMetadata:
    """Write ``ckpt_dir`` at layout ``target`` into ``out_dir``; returns the output's metadata.

    The one entry point for every kind of checkpoint (``tools/reshard_checkpoint.py`` calls it).
    It lives here, not in ``bridge/``, because only this tier knows both kinds: ``bridge``
    cannot import ``lora`` (``tests/unit/test_layering.py``).

    For a LoRA run: an adapter-only run at ``target`` whose base is ``out_dir/base`` (the run's
    base, resharded) or ``lora_base`` (an existing checkpoint of the same model at ``target``);
    with ``merge_lora`` a full checkpoint with the adapters merged. Anything else is resharded
    as it is (``bridge.reshard``).
    """
    reader = open_checkpoint(ckpt_dir, iteration, verify)
    is_run = isinstance(reader, LoRARunReader)
    if not is_run and (lora_base is not None or merge_lora):
        flag = "--lora-base" if lora_base is not None else "--merge-lora"
        raise ValueError(f"{flag} applies to a LoRA run, but {reader.iter_dir} is a full "
                         f"checkpoint (no {LORA_FILE}); drop {flag}")
    if lora_base is not None and merge_lora:
        raise ValueError("Can't provide both --lora-base and --merge-lora: --merge-lora writes a "
                         "full checkpoint, which needs no base. Choose one.")
    if not is_run or merge_lora:
        return reshard_checkpoint(reader, out_dir, target, force=force, progress=progress)
    target.validate(reader.shape)
    check_output_separate(out_dir, "--save-dir", {**reader.input_dirs(),
                                                  "--lora-base": lora_base})
    out_dir = Path(out_dir)
    with exclusive_output(out_dir, "reshard"):
        check_output_dir(out_dir, force)
        return _reshard_run_locked(reader, out_dir, target, lora_base, progress)


def _reshard_run_locked(run: LoRARunReader, out_dir: Path, target: ParallelLayout,
                        lora_base: "str | Path | None", progress: bool) -> CheckpointMetadata:
    # Everything that can refuse does so before staging exists.
    if lora_base is not None:
        candidate = CheckpointReader(lora_base, verify=run.verify)
        base_dir = check_base(run.lora, run.meta, run.iter_dir.parent, candidate, target)
        return write_staged(out_dir, lambda root: write_adapter_run(
            run, root, base_dir, base_dir.parent.resolve()))
    run_base = CheckpointReader(run.base_dir().parent, run.lora.base_iteration, run.verify)

    def write(root: Path) -> CheckpointMetadata:
        # The base is staged inside the run's staging directory, and lora.json names where
        # it will be once the whole directory is renamed to out_dir.
        write_resharded(run_base, root / LORA_BASE_SUBDIR, target, progress)
        return write_adapter_run(run, root, root / LORA_BASE_SUBDIR / run_base.iter_dir.name,
                                 out_dir.resolve() / LORA_BASE_SUBDIR)

    return write_staged(out_dir, write)


def adapter_stage(run: CheckpointReader, adapters: PeftAdapters, targets: tuple[str, ...],
                  layout: ParallelLayout, pp_rank: int
                  ) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Per TP rank: ``{"model" | "model0".. : {adapter name: tensor}}`` for pipeline stage
    ``pp_rank`` (stage-local layer numbers, as a LoRA run saves them)."""
    shape: ModelShape = run.shape
    ranks: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in range(layout.tp)]
    for chunk in range(layout.chunks):
        key = layout.model_key(chunk)
        for sd in ranks:
            sd[key] = {}
        for local, layer in enumerate(layout.chunk_layers(shape, pp_rank, chunk)):
            for target in targets:
                tn = layer_target_names(run.spec, shape, layer, target)
                if tn is None:  # a MoE layer's MLP without a shared expert
                    continue
                a_shards, b_shards = adapter_from_hf(tn, adapters[(layer, target)], shape,
                                                     layout.tp)
                prefix = tn.adapter_prefix(local)
                for sd, a, b in zip(ranks, a_shards, b_shards):
                    sd[key][prefix + "A"], sd[key][prefix + "B"] = a, b
    return ranks


def run_metadata(run: CheckpointMetadata, base: CheckpointMetadata) -> CheckpointMetadata:
    """The resharded run's metadata: the run's model and dtype, the base's layout and vocab
    padding (``check_base`` compares exactly these with the base when the run is loaded)."""
    return dataclasses.replace(run, layout=base.layout,
                               make_vocab_size_divisible_by=base.make_vocab_size_divisible_by,
                               padded_vocab_size=base.padded_vocab_size, producer="reshard")


def write_adapter_run(run: LoRARunReader, root: Path, base_iter_dir: Path,
                      base_path: Path) -> CheckpointMetadata:
    """Write ``run``'s adapters into ``root`` (a staging directory) at the layout of the base
    in ``base_iter_dir``, with a ``lora.json`` naming ``base_path`` (where that base will be
    once published) at its iteration and fingerprint."""
    info = run.lora
    meta = run_metadata(run.meta, read_metadata(base_iter_dir))
    layout = meta.layout
    adapters = read_run_adapters(run, info)
    it = run.iteration
    partial = partial_iteration_dir(root, it)
    partial.mkdir(parents=True)
    digests = []
    for pp_rank in range(layout.pp):
        for ep_rank in range(layout.ep):  # adapters are never on routed experts: the same
            digests += save_stage(  # in every expert-parallel rank's file
                partial, pp_rank, it, meta,
                adapter_stage(run, adapters, info.settings.targets, layout, pp_rank), ep_rank,
                extra=run.training_state())
    write_metadata(partial, meta)
    write_checksums(partial, digests)
    write_lora_info(partial, LoRACheckpointInfo(
        info.settings, str(base_path), int(base_iter_dir.name.split("_")[1]),
        base_fingerprint(base_iter_dir)))
    publish_iteration(root, it)
    return meta
