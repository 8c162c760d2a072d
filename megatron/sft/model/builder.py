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
from megatron.sft.model.block_spec import decoder_block_spec
from megatron.sft.runtime.cpu_mode import cpu_mode_active
from megatron.sft.model.layer_impl import LayerImpl, resolve_layer_impl
from megatron.sft.runtime.layout import LayoutError
from megatron.sft.runtime.parallel_dims import parallel_dims
from megatron.sft.model.tp_attributes import mark_tensor_parallel_weights
from megatron.sft.model.config import gpt_model_kwargs, transformer_config


def check_layout_matches(meta: CheckpointMetadata) -> None:
    """The running layout must read the checkpoint's rank files as they were written."""
    try:
        parallel_dims().layout.check_same_files(meta.layout)
    except LayoutError as e:
        raise CheckpointError(str(e)) from None


def check_expert_bias_layout(shape, layout, experts: str = "grouped_mm") -> None:
    """GPT-OSS's expert biases: megatron-core 0.16.1 runs them at expert TP 1 only (its config
    asserts). TP > 1 for attention works over whole experts (``--expert-tensor-parallel-size 1``,
    and ``ETP=1`` when converting, since the rank files hold the experts whole then). Its
    ``SequentialMLP`` adds the bias in place on a view without EP (autograd refuses it in
    backward), so ``sequential`` needs EP > 1."""
    if shape.moe is None or not shape.moe.linear_bias:
        return
    if layout.expert_tp > 1:
        raise LayoutError(f"{shape.architecture}: experts with biases run at expert tensor "
                          f"parallel size 1 only in megatron-core 0.16.1 (this layout has "
                          f"{layout.expert_tp}); keep --tensor-model-parallel-size "
                          f"{layout.tp} for attention with whole experts, "
                          "--expert-tensor-parallel-size 1 (convert with ETP=1), or use "
                          "--tensor-model-parallel-size 1; split the experts with "
                          "--expert-model-parallel-size")
    if experts == "sequential" and layout.ep == 1:
        raise LayoutError(f"{shape.architecture}: --moe-experts-impl sequential cannot train "
                          "experts with biases at --expert-model-parallel-size 1 (megatron-core "
                          "0.16.1 adds the bias in place on a view); use --moe-experts-impl "
                          "grouped_mm")


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
    check_expert_bias_layout(shape, dims.layout, impl.experts)
    config = transformer_config(
        shape, dims.layout, impl, params_dtype=dtype, cpu=cpu_mode_active(),
        architecture_overrides=settings.transformer, **config_overrides)
    if config.softmax_type == "learnable":  # GPT-OSS's sinks: refuse te/dense before building
        from megatron.sft.model.attention.sinks import check_sink_backend

        check_sink_backend(impl.attention)
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
        if shape.rope.yarn is not None:
            from megatron.sft.model.yarn import YarnConfig, apply_yarn

            apply_yarn(model, YarnConfig(**dict(shape.rope.yarn)), shape.rope.theta,
                       shape.head_dim)
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


def _layer_of(name: str) -> str:
    """The group a tensor is loaded with: its layer (``decoder.layers.3``), else itself."""
    parts = name.split(".")
    return ".".join(parts[:3]) if name.startswith("decoder.layers.") else name


def load_hf_weights(chunks: list, impl: LayerImpl, meta: CheckpointMetadata, source) -> None:
    """This rank's shard of the HF tensors into the chunks, read one tensor at a time
    (``bridge.rank_shard``) and handed to ``load_state_dict`` one layer at a time, so memory
    stays the model plus one layer; every model tensor must be filled."""
    from megatron.sft.bridge.rank_shard import rank_tensors
    from megatron.sft.bridge.rules import ShardContext

    dims = parallel_dims()
    spec, shape = shape_of(meta.hf_config)
    ctx = ShardContext(shape, meta.layout.tp, meta.padded_vocab_size,
                       expert_tp_size=meta.layout.expert_tp)
    keys = {meta.layout.model_key(c): c for c in range(len(chunks))}
    loaded: dict[str, set] = {k: set() for k in keys}
    pending: dict[str, torch.Tensor] = {}
    where = f"the HF model in {source.dir}"

    def flush(key: Optional[str]) -> None:
        if key is None or not pending:
            return
        wanted = impl.checkpoint_to_model(pending)
        result = chunks[keys[key]].load_state_dict(wanted, strict=False)
        if result.unexpected_keys:
            raise CheckpointError(f"{where} does not fit the model built from its config: "
                                  f"unexpected {list(result.unexpected_keys)[:6]}")
        loaded[key].update(wanted)
        pending.clear()

    current = None
    for key, name, tensor in rank_tensors(source, spec, shape, meta.layout, ctx, dims.tp_rank,
                                          dims.pp_rank, dims.ep_rank,
                                          getattr(torch, meta.params_dtype)):
        group = (key, _layer_of(name))
        if group != current:
            flush(current and current[0])
            current = group
        pending[name] = tensor
    flush(current and current[0])
    for key, chunk in keys.items():
        missing = [k for k in chunks[chunk].state_dict()
                   if k not in loaded[key] and not k.endswith("._extra_state")]
        if missing:
            raise CheckpointError(f"{where} does not fill the model built from its config: "
                                  f"missing {missing[:6]}")


def build_model_from_hf(hf_dir: "str | Path", impl: Optional[LayerImpl] = None, *,
                        make_vocab_size_divisible_by: int = 128, log=print,
                        **build_kwargs: Any) -> tuple[list, CheckpointMetadata]:
    """``build_model_from_checkpoint`` for an HF model directory: the metadata the converter
    would write at the running layout (``bridge.hf_source``), and each rank reading only its
    shard's bytes. Returns the chunks and that metadata (with ``hf_source``)."""
    from megatron.sft.bridge.hf_source import hf_checkpoint_metadata

    layout = parallel_dims().layout.for_checkpoint()
    meta, source = on_every_rank(lambda: hf_checkpoint_metadata(
        hf_dir, layout, make_vocab_size_divisible_by=make_vocab_size_divisible_by, log=log))
    impl = impl or resolve_layer_impl()
    build_kwargs.pop("verify", None)  # safetensors carry no checksums
    build_kwargs.setdefault("perform_initialization", False)  # every weight is loaded below
    chunks = build_model(meta, impl, **build_kwargs)
    on_every_rank(lambda: load_hf_weights(chunks, impl, meta, source))
    return chunks, meta


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
