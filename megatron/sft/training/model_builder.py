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
from megatron.sft.runtime.collective import on_every_rank
from megatron.sft.runtime.block_spec import decoder_block_spec
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
    if shape.moe is not None:  # alltoall moves only the routed tokens; allgather all of them
        config_overrides.setdefault("moe_token_dispatcher_type",
                                    "alltoall" if dims.layout.ep > 1 else "allgather")
    config = transformer_config(
        shape, dims.layout, impl, params_dtype=dtype, cpu=cpu_mode_active(),
        architecture_overrides=settings.transformer, **config_overrides)
    kwargs = gpt_model_kwargs(shape, meta.padded_vocab_size, seq_length)
    vpp = dims.layout.vpp
    chunks = []
    for chunk in range(dims.layout.chunks):
        pre_process, post_process = dims.stage_flags(chunk)
        # dense and MoE layers by global index, our norms on the local spec
        layers = dims.layout.chunk_layers(shape, dims.pp_rank, chunk)
        block_spec = decoder_block_spec(
            impl, qk_layernorm=shape.qk_layernorm, sliding_window=shape.sliding_window,
            moe_layers=[shape.moe is not None and shape.moe.is_moe_layer(i) for i in layers],
            spec_args=dict(settings.layer_spec))
        model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec,
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


def load_weights(chunks: list, impl: LayerImpl, iter_dir: Path, meta: CheckpointMetadata,
                 verify: bool = True) -> int:
    """Load this rank's file into the chunks (checked against the iteration's checksums first,
    unless ``verify`` is false); returns the checkpoint's iteration."""
    dims = parallel_dims()
    state = load_rank_state(iter_dir, meta.layout, dims.tp_rank, dims.pp_rank, dims.ep_rank,
                            mmap=True, verify=verify)
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
                                impl: Optional[LayerImpl] = None, verify: bool = True,
                                **build_kwargs: Any) -> tuple[list, CheckpointMetadata, int]:
    """``impl`` defaults to ``resolve_layer_impl()`` (auto/auto). A rank whose file is missing,
    truncated or corrupt stops every rank with the same one-line error naming it."""
    iter_dir = iteration_dir(Path(ckpt_dir), iteration)
    meta = read_metadata(iter_dir)
    check_layout_matches(meta)
    impl = impl or resolve_layer_impl()
    build_kwargs.setdefault("perform_initialization", False)  # every weight is loaded below
    chunks = build_model(meta, impl, **build_kwargs)
    it = on_every_rank(lambda: load_weights(chunks, impl, iter_dir, meta, verify))
    return chunks, meta, it
