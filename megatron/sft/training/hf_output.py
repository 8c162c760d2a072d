"""HF in, HF out, from the trainer: what a run that loaded an HF directory keeps of it, and the
HF model (``--save-hf``) and PEFT adapter (``--save-hf-adapter``) it writes.

Why export from the saved checkpoint instead of gathering in memory: the export is then
``merge_and_export.sh``'s own code (``bridge.export``) on the very files a user would export,
so ``--save-hf`` and the script give the same bytes by construction, every layout (TP, PP, VPP,
EP, a LoRA run merged into its base) is covered by the tests that already prove that code, and
rank 0 needs one pipeline stage of memory, never the whole model gathered over the network.
The cost is reading back what was just written (page cache, mostly) while the other ranks wait
at a barrier: ``--save-hf`` therefore needs ``--save``, and ``--save-hf-interval N`` saves a
checkpoint at every export.

``SAVE/hf_reference/`` is written once, at the first save of a run loaded from an HF directory:
the HF directory's ``config.json``, tokenizer and generation files (no weights). Exports copy
their tokenizer from it, so the run stays exportable after the HF directory is moved, and
``merge_and_export.sh SAVE`` finds it without an ``HF_REF``. ``--save-hf DIR`` always holds the
latest export (replaced atomically); ``DIR/export_source.json`` says which checkpoint iteration
it is, and a DIR that holds anything else is refused at start.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

from megatron.sft.bridge.checkpoint_io import CheckpointMetadata, read_metadata, write_staged
from megatron.sft.runtime.path_overlap import check_output_separate

REFERENCE_DIR = "hf_reference"
EXPORT_MARKER = "export_source.json"


def reference_dir(ckpt_dir: "str | Path", meta: Optional[CheckpointMetadata] = None
                  ) -> Optional[Path]:
    """Where an export of ``ckpt_dir`` takes tokenizer files from: its ``hf_reference/``, else
    the HF directory its metadata records (if it is still there), else ``None``."""
    from megatron.sft.bridge.hf_source import is_hf_model_dir

    saved = Path(ckpt_dir) / REFERENCE_DIR
    if saved.is_dir():
        return saved
    if meta is not None and meta.hf_source and is_hf_model_dir(meta.hf_source["path"]):
        return Path(meta.hf_source["path"])
    return None


def adapter_base(ckpt_dir: "str | Path", meta: CheckpointMetadata) -> Optional[Path]:
    """What a PEFT adapter of ``ckpt_dir`` names as ``base_model_name_or_path``: the HF
    directory the run loaded (it has the weights) while it is there, else its reference."""
    from megatron.sft.bridge.hf_source import is_hf_model_dir

    source = meta.hf_source["path"] if meta.hf_source else None
    return Path(source) if source and is_hf_model_dir(source) else reference_dir(ckpt_dir, meta)


def save_reference_files(hf_dir: "str | Path", save_dir: "str | Path") -> Optional[Path]:
    """Copy ``hf_dir``'s config, tokenizer and generation files (not its weights) into
    ``save_dir/hf_reference`` once (staged, then renamed); returns it, ``None`` if it existed."""
    from megatron.sft.bridge.export import _copy_reference_files

    from megatron.sft.bridge.hf_source import is_hf_model_dir

    out = Path(save_dir) / REFERENCE_DIR
    if out.exists() or not is_hf_model_dir(hf_dir):  # a moved source: exports fall back
        return None

    def write(staging: Path) -> None:
        _copy_reference_files(Path(hf_dir), staging)
        shutil.copy2(Path(hf_dir) / "config.json", staging / "config.json")

    write_staged(out, write)
    return out


def check_hf_outputs(cfg) -> None:
    """At start, before any step: ``--save-hf`` / ``--save-hf-adapter`` must not overlap the
    run's inputs or ``--save``, must be empty or hold an export of this ``--save``, and must be
    writable."""
    for flag, out in (("--save-hf", cfg.save_hf), ("--save-hf-adapter", cfg.save_hf_adapter)):
        if out is None:
            continue
        check_output_separate(out, flag, {"--load": cfg.load, "--save": cfg.save,
                                          "--data-path": None})
        path = Path(out)
        if path.exists() and not path.is_dir():  # a file: nothing can be exported there
            from megatron.sft.runtime.locks import NotWritableError, unwritable_reason

            raise NotWritableError(unwritable_reason(flag, out, OSError()))
        if not path.exists() or not any(path.iterdir()):
            continue
        marker = path / EXPORT_MARKER
        owner = json.loads(marker.read_text()).get("checkpoint") if marker.is_file() else None
        if owner != str(Path(cfg.save).resolve()):
            raise ValueError(
                f"{flag} {out} already holds files that this run did not export (it replaces "
                f"the directory at each export): choose an empty or new {flag} directory, or "
                "remove it")
    _check_writable(cfg)


def _check_writable(cfg) -> None:
    """``--save-hf`` / ``--save-hf-adapter`` can be written, checked as ``--save`` is (its lock
    taken and released, on rank 0; every rank hears the outcome): a read-only place, a file in
    the path or a filesystem that refuses new files is an error now, not after training."""
    from megatron.sft.runtime.collective import on_every_rank
    from megatron.sft.runtime.locks import check_writable

    def probe() -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        for flag, out in (("--save-hf", cfg.save_hf), ("--save-hf-adapter", cfg.save_hf_adapter)):
            if out is not None:
                check_writable(out, flag, "HF export")

    on_every_rank(probe)


def export_iteration(save_dir: str, iteration: int, hf_out: Optional[str],
                     adapter_out: Optional[str], log: Callable[[str], None] = print) -> None:
    """``merge_and_export.sh SAVE REF hf_out ITER`` (a LoRA run merged into its base), and with
    ``adapter_out`` ``export_lora_adapter.sh SAVE REF adapter_out ITER``; run on one rank."""
    from megatron.sft.bridge.checkpoint_io import iteration_dir
    from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
    from megatron.sft.lora.merge import open_checkpoint
    from megatron.sft.lora.peft_export import export_lora_adapter

    meta = read_metadata(iteration_dir(Path(save_dir), iteration))
    ref = reference_dir(save_dir, meta)
    marker = {"checkpoint": str(Path(save_dir).resolve()), "iteration": iteration}
    if hf_out is not None:
        reader = open_checkpoint(save_dir, iteration)
        export_megatron_to_hf(reader, hf_out, ref, ExportOptions(
            iteration=iteration, force=True, progress=False))
        (Path(hf_out) / EXPORT_MARKER).write_text(json.dumps(marker) + "\n")
        log(f"exported iteration {iteration} as an HF model to {hf_out}")
    if adapter_out is not None:
        export_lora_adapter(save_dir, adapter_out, adapter_base(save_dir, meta), iteration,
                            force=True)
        (Path(adapter_out) / EXPORT_MARKER).write_text(json.dumps(marker) + "\n")
        log(f"exported iteration {iteration}'s LoRA adapter (PEFT) to {adapter_out}")
