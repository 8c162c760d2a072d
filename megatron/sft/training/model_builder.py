"""Build this rank's megatron-core ``GPTModel`` chunk(s) from a checkpoint's metadata and load
its weights, so nobody repeats model-shape flags that the checkpoint already knows."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from megatron.sft.bridge.architectures import shape_of
from megatron.sft.bridge.checkpoint_io import (
    CheckpointError,
    CheckpointMetadata,
    iteration_dir,
    load_rank_state,
    read_metadata,
)
from megatron.sft.runtime.cpu_mode import cpu_mode_active
from megatron.sft.runtime.layer_impl import LayerImpl, resolve_layer_impl
from megatron.sft.runtime.layout import LayoutError
from megatron.sft.runtime.parallel_dims import parallel_dims
from megatron.sft.runtime.tp_attributes import mark_tensor_parallel_weights
from megatron.sft.training.model_config import gpt_model_kwargs, transformer_config


def check_layout_matches(meta: CheckpointMetadata) -> None:
    """The running layout must read the checkpoint's rank files as they were written."""
    try:
        parallel_dims().layout.check_same_files(meta.layout)
    except LayoutError as e:
        raise CheckpointError(str(e)) from None


def build_model(meta: CheckpointMetadata, impl: LayerImpl, *,
                params_dtype: Optional[torch.dtype] = None, seq_length: Optional[int] = None,
                parallel_output: bool = True, **config_overrides: Any) -> list:
    """One ``GPTModel`` per virtual pipeline chunk of this rank, built with ``impl``'s
    modules at the running layout (the checkpoint's, plus what does not change its files)."""
    from megatron.core.models.gpt import GPTModel

    spec, shape = shape_of(meta.hf_config)
    dims = parallel_dims()
    dtype = params_dtype or getattr(torch, meta.params_dtype)
    settings = spec.megatron_settings(meta.hf_config)
    config = transformer_config(
        shape, dims.layout, impl, params_dtype=dtype, cpu=cpu_mode_active(),
        architecture_overrides=settings.transformer, **config_overrides)
    layer_spec = impl.layer_spec(shape.qk_layernorm, shape.sliding_window, **settings.layer_spec)
    kwargs = gpt_model_kwargs(shape, meta.padded_vocab_size, seq_length)
    vpp = dims.layout.vpp
    chunks = []
    for chunk in range(dims.layout.chunks):
        pre_process, post_process = dims.stage_flags(chunk)
        model = GPTModel(
            config=config,
            transformer_layer_spec=impl.block_spec(layer_spec, config, chunk if vpp else None),
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            vp_stage=chunk if vpp else None,
            **kwargs,
        )
        # Built without initialisation, megatron-core 0.16 leaves TP-split weights unmarked and
        # its grad norm (and clipping) would skip their shards on TP ranks > 0.
        mark_tensor_parallel_weights(model)
        # megatron-core's local-spec norms (torch RMSNorm) ignore params_dtype and stay fp32.
        # TE's norms and HF's bf16 checkpoints keep them in the model dtype, and the distributed
        # optimizer mis-indexes fp32 params mixed into bf16 groups, so make the model uniform.
        if dtype != torch.float32:
            model = model.to(dtype)
        if not cpu_mode_active() and torch.cuda.is_available():
            model = model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def load_weights(chunks: list, impl: LayerImpl, iter_dir: Path, meta: CheckpointMetadata) -> int:
    """Load this rank's file into the chunks; returns the checkpoint's iteration."""
    dims = parallel_dims()
    state = load_rank_state(iter_dir, meta.layout, dims.tp_rank, dims.pp_rank, dims.ep_rank,
                            mmap=True)
    for chunk, model in enumerate(chunks):
        key = meta.layout.model_key(chunk)
        if key not in state:
            raise CheckpointError(f"{iter_dir}: rank file has no {key!r} entry")
        wanted = impl.checkpoint_to_model(state[key])
        result = model.load_state_dict(wanted, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"{iter_dir} does not fit the model built from its metadata: missing "
                f"{missing[:6]}, unexpected {list(result.unexpected_keys)[:6]}"
            )
    return int(state.get("iteration", 0))


def build_model_from_checkpoint(ckpt_dir: "str | Path", iteration: Optional[int] = None,
                                impl: Optional[LayerImpl] = None, **build_kwargs: Any
                                ) -> tuple[list, CheckpointMetadata, int]:
    """``impl`` defaults to ``resolve_layer_impl()`` (auto/auto)."""
    iter_dir = iteration_dir(Path(ckpt_dir), iteration)
    meta = read_metadata(iter_dir)
    check_layout_matches(meta)
    impl = impl or resolve_layer_impl()
    build_kwargs.setdefault("perform_initialization", False)  # every weight is loaded below
    chunks = build_model(meta, impl, **build_kwargs)
    it = load_weights(chunks, impl, iter_dir, meta)
    return chunks, meta, it
