"""The attention-backend registry: every registered backend is complete and tested, the CLI's
choices and help are the registry's, ``auto`` picks in the registered order, and a backend
registered in one place (here: in a test) reaches the CLI and the model with no other edit."""

import dataclasses
import functools
import importlib.util
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.sft.model import attention, layer_impl
from megatron.sft.model.attention import (
    AttentionBackendSpec,
    AttentionInputs,
    PackedCoreAttention,
    attention_backend_choices,
    attention_backends,
    auto_order,
    dense_reference_attention,
    document_segments,
    get_attention_backend,
    packed_attention_mask,
    register_backend,
    sdpa_attention,
)
from megatron.sft.model.layer_impl import (
    TRANSFORMER_IMPLS,
    LayerImpl,
    LayerImplError,
    resolve_layer_impl,
)
from megatron.sft.training.arguments import TrainConfig, build_parser, parse_config

REPO = Path(__file__).resolve().parents[3]
NAMES = [s.name for s in attention_backends()]
PACKED = [s.name for s in attention_backends() if s.kernel is not None]
CU = torch.tensor([[0, 3, 5, -1], [0, 6, -1, -1]])  # 2 rows of 6: documents 3, 2, pad 1 | 6


class _Config:  # what PackedCoreAttention reads from megatron-core's TransformerConfig
    context_parallel_size = 1
    attention_dropout = 0.0
    kv_channels = 8


def _choices(parser, dest):
    return next(a for a in parser._actions if a.dest == dest).choices


# ------------------------------------------------------------------ every registered backend
@pytest.mark.parametrize("name", NAMES)
def test_every_registered_backend_is_complete(name):
    spec = get_attention_backend(name)
    assert spec.description.strip() and "\n" not in spec.description
    for linear in ("te", "local"):
        for device in ("cpu", "cuda"):
            reason = spec.check(linear, device)
            assert reason is None or (isinstance(reason, str) and "--attention-backend" in reason)
    # The declared requirements are what the check enforces.
    if spec.needs_te_layers:
        assert "needs Transformer Engine layers" in spec.check("local", "cuda")
    for device in ("cpu", "cuda"):
        if spec.devices is not None and device not in spec.devices:
            assert "only" in spec.check("te", device) and "only" in spec.check("local", device)
    assert isinstance(spec.config_overrides(None), dict)
    assert isinstance(spec.config_overrides(4), dict)
    unpacked = spec.attention_inputs(None, 2, 6)
    packed = spec.attention_inputs(CU, 2, 6, None)
    assert isinstance(unpacked, AttentionInputs) and isinstance(packed, AttentionInputs)
    assert packed != AttentionInputs(), "packed rows must tell attention where documents end"
    if spec.kernel is not None:  # a packed backend runs as PackedCoreAttention
        core = spec.core_attention("local", 5)
        assert core.func is PackedCoreAttention and core.keywords == {"backend": name,
                                                                      "window": 5}
        assert isinstance(packed.packed_seq_params, attention.DocumentSegments)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("name", PACKED)
def test_packed_kernels_equal_the_dense_reference_on_cpu(name, window):
    reason = get_attention_backend(name).check("local", "cpu")
    if reason is not None:
        pytest.skip(f"{reason} (tests/gpu/test_attention_backends_gpu.py covers it)")
    module = PackedCoreAttention(_Config(), 1, None, "self", backend=name, window=window)
    segments = document_segments(CU, 2, 6, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    out = module(q, k, v, packed_seq_params=segments)  # [s, b, hq * d]
    flat = [x.transpose(0, 1).reshape(12, x.shape[2], 8) for x in (q, k, v)]
    ref = dense_reference_attention(*flat, segments.bounds, module.scale, window)
    assert torch.allclose(out.transpose(0, 1).reshape(12, 4, 8), ref, atol=1e-12)


# ------------------------------------------------------------------ the CLI reads the registry
def test_cli_choices_and_help_are_the_registry():
    assert attention_backend_choices() == ("auto", *NAMES)
    parser = build_parser()
    assert _choices(parser, "attention_backend") == attention_backend_choices()
    assert _choices(parser, "transformer_impl") == TRANSFORMER_IMPLS
    help_text = next(a for a in parser._actions if a.dest == "attention_backend").help
    for spec in attention_backends():
        assert f"{spec.name} ({spec.description}" in help_text
    assert ("auto = te with TE layers, else varlen on CUDA, else flex on CUDA, else sdpa"
            in help_text)
    # tools/check_hf_parity.py offers the same choices.
    loaded = importlib.util.spec_from_file_location("check_hf_parity",
                                                    REPO / "tools" / "check_hf_parity.py")
    parity = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(parity)
    for name in attention_backend_choices():
        assert parity.parse_args(["--load", "c", "--hf-model", "h",
                                  "--attention-backend", name]).attention_backend == name
    with pytest.raises(SystemExit):
        parity.parse_args(["--load", "c", "--hf-model", "h", "--attention-backend", "flash"])


def test_yaml_values_are_checked_against_the_registry():
    cfg = TrainConfig(load="/c", data_path="/d", train_iters=1, attention_backend="flash")
    with pytest.raises(ValueError, match="--attention-backend 'flash': use one of auto, te, "
                                         "varlen, flex, sdpa, dense$"):
        cfg.validate(1, 4)
    cfg = TrainConfig(load="/c", data_path="/d", train_iters=1, transformer_impl="tee")
    with pytest.raises(ValueError, match="--transformer-impl 'tee': use one of auto, "
                                         "transformer_engine, local"):
        cfg.validate(1, 4)


def test_importing_the_registry_costs_no_megatron_core_import():
    # --help builds the parser from the registry; megatron.core takes seconds to import.
    code = ("import sys; from megatron.sft.training.arguments import build_parser; "
            "build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith('megatron.core')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------ auto
def test_auto_order_and_resolution_on_cpu_and_cuda(monkeypatch):
    assert [s.name for s in auto_order()] == ["te", "varlen", "flex", "sdpa"]  # dense: never
    assert resolve_layer_impl("local", "auto", "cpu") == LayerImpl("local", "sdpa")
    monkeypatch.setattr(attention.backends, "varlen_available", lambda: True)
    assert resolve_layer_impl("local", "auto", "cuda") == LayerImpl("local", "varlen")
    assert resolve_layer_impl("auto", "auto", "cuda").attention in ("te", "varlen")
    monkeypatch.setattr(attention.backends, "varlen_available", lambda: False)
    assert resolve_layer_impl("local", "auto", "cuda") == LayerImpl("local", "flex")
    with pytest.raises(LayerImplError, match="has no torch.nn.attention.varlen; use "
                                             "--attention-backend flex"):
        resolve_layer_impl("local", "varlen", "cuda")
    monkeypatch.setattr(layer_impl, "transformer_engine_available", lambda: True)
    assert resolve_layer_impl("auto", "auto", "cuda") == LayerImpl("te", "te")
    assert resolve_layer_impl("transformer_engine", "auto", "cpu") == LayerImpl("te", "te")
    assert resolve_layer_impl("auto", "auto", "cpu") == LayerImpl("local", "sdpa")


# ------------------------------------------------------------------ one place to add one
def test_a_backend_registered_here_reaches_the_cli_and_the_model(monkeypatch):
    calls = []

    def toy_kernel(q, k, v, segments, scale, window=None):
        calls.append(segments.bounds)
        return sdpa_attention(q, k, v, segments.bounds, scale, window)

    toy = AttentionBackendSpec(name="toy", description="a test's own kernel", kernel=toy_kernel)
    with monkeypatch.context() as m:
        m.setattr(attention.registry, "_BACKENDS", dict(attention.registry._BACKENDS))  # restored on exit
        register_backend(toy)
        assert attention_backend_choices() == ("auto", *NAMES, "toy")
        parser = build_parser()
        assert _choices(parser, "attention_backend")[-1] == "toy"
        assert "toy (a test's own kernel)" in next(
            a for a in parser._actions if a.dest == "attention_backend").help
        cfg = parse_config(["--load", "/c", "--data-path", "/d", "--train-iters", "1",
                            "--attention-backend", "toy"])
        cfg.validate(1, 4)  # YAML/flag value accepted
        impl = resolve_layer_impl("local", "toy", "cpu")
        assert impl == LayerImpl("local", "toy") and impl.backend is toy
        core = impl.backend.core_attention(impl.linear, None)
        module = core(_Config(), 1, None, "self")
        segments = impl.attention_inputs(CU, 2, 6).packed_seq_params
        q, k, v = (torch.randn(6, 2, 2, 8) for _ in range(3))
        assert module(q, k, v, packed_seq_params=segments).shape == (6, 2, 16)
        assert calls == [(0, 3, 5, 6, 12)]
        assert "toy" not in [s.name for s in auto_order()]  # auto_rank=None: never auto
        with pytest.raises(ValueError, match="'toy' is registered twice"):
            register_backend(toy)
    assert "toy" not in attention_backend_choices()
    with pytest.raises(ValueError, match="--attention-backend 'toy': use one of auto, te"):
        get_attention_backend("toy")


@pytest.mark.parametrize("fields, message", [
    (dict(name="auto", description="d", kernel=sdpa_attention), "other than '' and 'auto'"),
    (dict(name="x", description="", kernel=sdpa_attention), "one-line description"),
    (dict(name="x", description="d"), "give a kernel"),
])
def test_an_incomplete_backend_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        AttentionBackendSpec(**fields)


# ------------------------------------------------------------------ what te and dense build
def test_te_flattens_rows_to_thd_and_dense_builds_the_mask():
    te = LayerImpl("te", "te").attention_inputs(CU, 2, 6)
    params = te.packed_seq_params
    assert te.flatten_rows and params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 6, 12] and params.max_seqlen_q == 6
    assert LayerImpl("te", "te").attention_inputs(None, 2, 6) == AttentionInputs()
    te_config = LayerImpl("te", "te").config_overrides(cpu=True, sliding_window=4)
    assert te_config["window_size"] == (3, 0)
    assert "window_size" not in LayerImpl("local", "sdpa").config_overrides(cpu=True,
                                                                           sliding_window=4)

    dense = LayerImpl("local", "dense")
    mask = dense.attention_inputs(CU, 2, 6).attention_mask
    assert mask.shape == (2, 1, 6, 6) and torch.equal(mask, packed_attention_mask(CU, 6))
    assert dense.attention_inputs(None, 2, 6) == AttentionInputs()  # megatron-core's own mask
    banded = dense.attention_inputs(None, 2, 6, sliding_window=2).attention_mask
    assert banded.shape == (2, 1, 6, 6) and not banded[0, 0, 5, 4] and banded[0, 0, 5, 3]


def test_layer_spec_takes_the_backends_core_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    def core(impl):
        spec = impl.layer_spec(qk_layernorm=False, sliding_window=7)
        return spec.submodules.self_attention.submodules.core_attention

    packed = core(LayerImpl("local", "sdpa"))
    assert isinstance(packed, functools.partial) and packed.func is PackedCoreAttention
    assert packed.keywords == {"backend": "sdpa", "window": 7}
    assert core(LayerImpl("local", "dense")) is DotProductAttention


def test_document_segments_is_megatron_cores_packed_seq_params():
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron.sft.model.attention import DocumentSegments

    seg = document_segments(CU, 2, 6, torch.device("cpu"))
    assert isinstance(seg, DocumentSegments) and isinstance(seg, PackedSeqParams)
    assert dataclasses.is_dataclass(seg) and seg.bounds == (0, 3, 5, 6, 12)
    assert pickle.loads(pickle.dumps(seg)).bounds == seg.bounds


def test_context_parallel_with_pipeline_is_decided_in_one_place(monkeypatch):
    """TE's own CP cannot cross pipeline stages: the flag check, ``auto`` and an explicit choice
    all get that answer from ``AttentionBackendSpec.cp_problem`` (no second copy elsewhere)."""
    from megatron.sft.training.arguments import parse_config

    te = get_attention_backend("te")
    assert te.cp_problem(2, 2).startswith("--attention-backend te with --context-parallel-size")
    assert te.cp_problem(2, 1) is None and te.cp_problem(1, 4) is None
    assert "has no context parallelism" in get_attention_backend("dense").cp_problem(2)
    monkeypatch.setattr(layer_impl, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(attention.backends, "varlen_available", lambda: True)
    assert resolve_layer_impl("auto", "auto", "cuda", cp=2) == LayerImpl("te", "te")
    # auto passes over te at CP x PP and takes the next backend that does CP through stages
    assert resolve_layer_impl("auto", "auto", "cuda", cp=2, pp=2).attention == "varlen"
    with pytest.raises(LayerImplError, match="cannot cross pipeline stages"):
        resolve_layer_impl("auto", "te", "cuda", cp=2, pp=2)
    cfg = parse_config(["--load", "/c", "--data-path", "/d", "--train-iters", "2",
                        "--attention-backend", "te", "--context-parallel-size", "2",
                        "--pipeline-model-parallel-size", "2", "--seq-length", "64"])
    with pytest.raises(ValueError, match="cannot cross pipeline stages"):
        cfg.validate(world_size=4)
