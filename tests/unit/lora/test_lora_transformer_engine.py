"""LoRA under the Transformer Engine layer spec, proven on CPU with stand-ins.

Transformer Engine cannot be installed without a GPU, so megatron-core 0.16's three TE wrappers
(``megatron/core/extensions/transformer_engine.py``) are replaced by stand-ins written from that
source: the same class names; per-rank weights with TE's per-rank ``in_features`` /
``out_features``; ``tp_size``, ``parallel_mode``, ``sequence_parallel`` (TE keeps it only when
``tp_size > 1``); ``forward(x) -> (out, bias or None)`` with the bias returned only under
``skip_bias_add``; and for the fused norm + linear ``layer_norm_weight``, ``layer_norm_bias``
(LayerNorm only), ``normalization``, ``eps``, ``zero_centered_gamma``, applied to ``x`` before
``W`` (with torch's own ``rms_norm`` / ``layer_norm``, independent of the adapter's).

Adapters on them are checked against a hand-written float64 reference and against
megatron-core's real local ``ColumnParallelLinear`` / ``RowParallelLinear`` on the same
weights. megatron-core's TP regions and local linears need a process group even at TP 1, so
this module runs in a world of one (gloo, in-process). Not covered here: real TE kernels, TP > 1
forwards (the adapter's TP reductions are the local spec's, tested in
``tests/integration/training/test_lora_training.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron.sft.bridge.checkpoint_io import CheckpointMetadata, save_rank_state
from megatron.sft.model.layer_impl import LayerImpl
from megatron.sft.lora.adapters import add_adapter, attach_lora, init_adapters, load_adapters
from megatron.sft.lora.bases import LoRABaseError
from megatron.sft.lora.settings import LoRASettings, adapter_state_dict, is_adapter_name
from megatron.sft.runtime.layout import ParallelLayout
from megatron.sft.runtime.parallel_dims import ParallelDims, set_parallel_dims

HIDDEN, QKV, PROJ_IN, FFN = 16, 32, 24, 20  # fc1 has 2 * FFN rows (gate; up)
SETTINGS = LoRASettings(rank=4, alpha=8.0)  # scale 2
TARGETS = [("self_attention", "linear_qkv"), ("self_attention", "linear_proj"),
           ("mlp", "linear_fc1"), ("mlp", "linear_fc2")]


@pytest.fixture(scope="module", autouse=True)
def world_of_one(tmp_path_factory):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    store = tmp_path_factory.mktemp("process_group") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    set_parallel_dims(ParallelDims.from_parallel_state(ParallelLayout()))
    yield
    set_parallel_dims(None)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


# ---------------------------------------------------------------- Transformer Engine stand-ins
class _TELinearStandIn(torch.nn.Module):
    """What megatron's ``TELinear`` and TE's ``Linear`` set up, minus the kernels."""

    def __init__(self, input_size, output_size, *, parallel_mode, bias=False, skip_bias_add=False,
                 tp_size=1, sequence_parallel=False):
        super().__init__()
        self.tp_size, self.parallel_mode = tp_size, parallel_mode
        self.sequence_parallel = tp_size > 1 and sequence_parallel
        self.in_features = input_size // tp_size if parallel_mode == "row" else input_size
        self.out_features = output_size // tp_size if parallel_mode == "column" else output_size
        self.use_bias, self.te_return_bias = bias, skip_bias_add and bias
        self.weight = torch.nn.Parameter(torch.randn(self.out_features, self.in_features) / 4)
        self.bias = torch.nn.Parameter(torch.randn(self.out_features) / 4) if bias else None

    def _linear(self, x):
        out = F.linear(x, self.weight)
        if self.use_bias and not self.te_return_bias:
            out = out + self.bias
        return (out, self.bias) if self.te_return_bias else (out, None)


class TEColumnParallelLinear(_TELinearStandIn):
    def __init__(self, input_size, output_size, **kw):
        super().__init__(input_size, output_size, parallel_mode="column", **kw)

    def forward(self, x):
        return self._linear(x)


class TERowParallelLinear(_TELinearStandIn):
    def __init__(self, input_size, output_size, **kw):
        super().__init__(input_size, output_size, parallel_mode="row", **kw)

    def forward(self, x):  # the output all-reduce is the identity at TP 1
        return self._linear(x)


class TELayerNormColumnParallelLinear(_TELinearStandIn):
    def __init__(self, input_size, output_size, *, normalization="RMSNorm", eps=1e-5,
                 zero_centered_gamma=False, **kw):
        super().__init__(input_size, output_size, parallel_mode="column", **kw)
        self.normalization, self.eps, self.zero_centered_gamma = (
            normalization, eps, zero_centered_gamma)
        self.layer_norm_weight = torch.nn.Parameter(
            torch.randn(input_size) / 4 + (0.0 if zero_centered_gamma else 1.0))
        self.layer_norm_bias = (torch.nn.Parameter(torch.randn(input_size) / 4)
                                if normalization == "LayerNorm" else None)

    def forward(self, x):
        gamma = self.layer_norm_weight + (1.0 if self.zero_centered_gamma else 0.0)
        if self.normalization == "RMSNorm":
            normed = F.rms_norm(x, (self.in_features,), gamma, self.eps)
        else:
            normed = F.layer_norm(x, (self.in_features,), gamma, self.layer_norm_bias, self.eps)
        return self._linear(normed)


# ---------------------------------------------------------------- tiny one-layer models
def _chunk(linears: dict, norms: dict | None = None, mlp_cls=torch.nn.Module):
    """``decoder.layers[0]`` with the four targets (and, for the local spec, its norms): the
    attributes ``attach_lora`` / ``init_adapters`` walk in a megatron-core GPTModel."""
    layer = torch.nn.Module()
    layer.layer_number = 1
    layer.self_attention, layer.mlp = torch.nn.Module(), mlp_cls()
    for parent, name in TARGETS:
        setattr(getattr(layer, parent), name, linears[name])
    for name, norm in (norms or {}).items():
        setattr(layer, name, norm)
    chunk = torch.nn.Module()
    chunk.decoder = torch.nn.Module()
    chunk.decoder.layers = torch.nn.ModuleList([layer])
    return chunk


def _te_chunk(normalization="RMSNorm", zero_centered_gamma=False, tp_size=1,
              mlp_cls=torch.nn.Module, **kw):
    norm = dict(normalization=normalization, zero_centered_gamma=zero_centered_gamma)
    return _chunk({
        "linear_qkv": TELayerNormColumnParallelLinear(HIDDEN, QKV, tp_size=tp_size, **norm, **kw),
        "linear_proj": TERowParallelLinear(PROJ_IN, HIDDEN, tp_size=tp_size, **kw),
        "linear_fc1": TELayerNormColumnParallelLinear(HIDDEN, 2 * FFN, tp_size=tp_size, **norm,
                                                      **kw),
        "linear_fc2": TERowParallelLinear(FFN, HIDDEN, tp_size=tp_size, **kw)}, mlp_cls=mlp_cls)


def _local_chunk():
    """megatron-core's own linears, as its local GPT spec builds them, plus the separate norms."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=2,
                            use_cpu_initialization=True)
    init = torch.nn.init.normal_

    def column(i, o):
        return ColumnParallelLinear(i, o, config=cfg, init_method=init, bias=False,
                                    gather_output=False)

    def row(i, o):
        return RowParallelLinear(i, o, config=cfg, init_method=init, bias=False,
                                 input_is_parallel=True, skip_bias_add=True)

    return _chunk({"linear_qkv": column(HIDDEN, QKV), "linear_proj": row(PROJ_IN, HIDDEN),
                   "linear_fc1": column(HIDDEN, 2 * FFN), "linear_fc2": row(FFN, HIDDEN)},
                  norms={"input_layernorm": torch.nn.RMSNorm(HIDDEN, eps=1e-5),
                         "pre_mlp_layernorm": torch.nn.RMSNorm(HIDDEN, eps=1e-5)})


def _linears(chunk):
    layer = chunk.decoder.layers[0]
    return {name: getattr(getattr(layer, parent), name) for parent, name in TARGETS}


def _random_adapters(chunk, seed=0):
    """B is zero after ``attach_lora``; give it values so the adapter path counts."""
    init_adapters([chunk], SETTINGS, seed=seed, b_std=0.5)


# ---------------------------------------------------------------- the fused norm + linear
def _hand_norm(x, m):
    """TE's LayerNormLinear norm written out, in float64."""
    gamma = m.layer_norm_weight.double() + (1.0 if m.zero_centered_gamma else 0.0)
    if m.normalization == "RMSNorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + m.eps) * gamma
    centred = x - x.mean(-1, keepdim=True)
    var = (centred * centred).mean(-1, keepdim=True)
    return centred / torch.sqrt(var + m.eps) * gamma + m.layer_norm_bias.double()


@pytest.mark.parametrize("zero_centered_gamma", [False, True])
@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_fused_norm_linear_adapter_sees_the_normalised_input(normalization, zero_centered_gamma):
    """out == W·norm(x) + (alpha/r)·B·A·norm(x), and only A and B learn."""
    chunk = _te_chunk(normalization, zero_centered_gamma)
    assert attach_lora([chunk], SETTINGS) > 0
    _random_adapters(chunk)
    qkv = _linears(chunk)["linear_qkv"]
    x = torch.randn(5, 2, HIDDEN, requires_grad=True)  # [s, b, h], not normalised
    out, bias = qkv(x)
    assert bias is None and out.shape == (5, 2, QKV)

    x64 = x.detach().double().requires_grad_()
    a64, b64 = (p.detach().double().requires_grad_() for p in (qkv.lora.A, qkv.lora.B))
    normed = _hand_norm(x64, qkv)
    want = normed @ qkv.weight.double().T + SETTINGS.scale * normed @ a64.T @ b64.T
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)

    probe = torch.randn_like(want)
    (out.double() * probe).sum().backward()
    (want * probe).sum().backward()
    for got, ref in ((x.grad, x64.grad), (qkv.lora.A.grad, a64.grad), (qkv.lora.B.grad, b64.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    grads = {n for n, p in chunk.named_parameters() if p.grad is not None}
    assert grads == {"decoder.layers.0.self_attention.linear_qkv.lora.A",
                     "decoder.layers.0.self_attention.linear_qkv.lora.B"}
    assert {n for n, p in chunk.named_parameters() if p.requires_grad} == {
        n for n, _ in chunk.named_parameters() if is_adapter_name(n)}


def test_te_and_local_spec_adapters_agree_on_the_same_weights():
    """The TE layers (norm fused into qkv/fc1) and megatron-core's local ones (separate RMSNorm
    modules) with equal weights and equal adapters: equal outputs and equal gradients."""
    te, local = _te_chunk(), _local_chunk()
    attach_lora([te], SETTINGS)
    attach_lora([local], SETTINGS)
    _random_adapters(te, seed=7)
    _random_adapters(local, seed=7)  # seeded per (layer, target): the same adapters
    te_lin, local_lin = _linears(te), _linears(local)
    with torch.no_grad():
        for name in te_lin:
            local_lin[name].weight.copy_(te_lin[name].weight)
        local.decoder.layers[0].input_layernorm.weight.copy_(te_lin["linear_qkv"].layer_norm_weight)
        local.decoder.layers[0].pre_mlp_layernorm.weight.copy_(
            te_lin["linear_fc1"].layer_norm_weight)
    norms = {"linear_qkv": local.decoder.layers[0].input_layernorm,
             "linear_fc1": local.decoder.layers[0].pre_mlp_layernorm}
    for name, width in (("linear_qkv", HIDDEN), ("linear_proj", PROJ_IN),
                        ("linear_fc1", HIDDEN), ("linear_fc2", FFN)):
        x = torch.randn(3, 2, width)
        x_te, x_local = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = te_lin[name](x_te)[0]
        want = local_lin[name](norms[name](x_local) if name in norms else x_local)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
        probe = torch.randn_like(got)
        (got * probe).sum().backward()
        (want * probe).sum().backward()
        torch.testing.assert_close(x_te.grad, x_local.grad, rtol=1e-5, atol=1e-5, msg=name)
        for p in ("A", "B"):
            torch.testing.assert_close(getattr(te_lin[name].lora, p).grad,
                                       getattr(local_lin[name].lora, p).grad,
                                       rtol=1e-5, atol=1e-5, msg=f"{name}.lora.{p}")


def test_adapter_sizes_come_from_the_per_rank_weight():
    """TP 2: column bases keep A whole and split B's rows; row bases split A's columns. Local
    linears at TP 1 get the same rule from their own weights."""
    r = SETTINGS.rank
    te = _linears(_te_chunk(tp_size=2))
    want = {"linear_qkv": ((r, HIDDEN), (QKV // 2, r)),
            "linear_proj": ((r, PROJ_IN // 2), (HIDDEN, r)),
            "linear_fc1": ((r, HIDDEN), (FFN, r)),  # 2 * FFN rows / 2 ranks
            "linear_fc2": ((r, FFN // 2), (HIDDEN, r))}
    for name, base in te.items():
        ad = add_adapter(base, name, SETTINGS)
        assert (tuple(ad.A.shape), tuple(ad.B.shape)) == want[name], name
        split = ad.B if name in ("linear_qkv", "linear_fc1") else ad.A
        assert split.tensor_model_parallel and split.partition_dim == (0 if split is ad.B else 1)
    for name, base in _linears(_local_chunk()).items():
        ad = add_adapter(base, name, SETTINGS)
        out, inp = base.weight.shape
        assert (tuple(ad.A.shape), tuple(ad.B.shape)) == ((r, inp), (out, r)), name


def test_sequence_parallel_bases_mark_the_replicated_factor():
    """With SP the replicated factor (column A, row B) sees s / TP tokens on each rank; it is
    marked so megatron-core sums its gradient over TP. Without SP nothing is marked."""
    for sp in (True, False):
        for name, base in _linears(_te_chunk(tp_size=2, sequence_parallel=sp)).items():
            ad = add_adapter(base, name, SETTINGS)
            replicated = ad.A if name in ("linear_qkv", "linear_fc1") else ad.B
            assert ad.sequence_parallel is sp
            assert getattr(replicated, "sequence_parallel", False) is sp, (name, sp)


def test_returned_bias_passes_through_untouched():
    base = TERowParallelLinear(PROJ_IN, HIDDEN, bias=True, skip_bias_add=True)
    ad = add_adapter(base, "linear_proj", SETTINGS)
    with torch.no_grad():
        ad.B.normal_()
    x = torch.randn(3, PROJ_IN)
    out, bias = base(x=x)  # by keyword too
    assert bias is base.bias
    torch.testing.assert_close(out, x @ base.weight.T + SETTINGS.scale * x @ ad.A.T @ ad.B.T)


# ---------------------------------------------------------------- what is refused, and how
class TEFusedMLP(torch.nn.Module):
    """Stand-in name: megatron-core's MLP that runs fc1/fc2 as fused TE ops."""


def _swap(chunk, name, base):
    layer = chunk.decoder.layers[0]
    setattr(getattr(layer, dict((n, p) for p, n in TARGETS)[name]), name, base)
    return chunk


def _no_eps():
    m = TELayerNormColumnParallelLinear(HIDDEN, QKV)
    del m.eps
    return m


def _expert_row():
    """TE is given ``parallel_mode=None`` for expert (and duplicated) linears."""
    m = TERowParallelLinear(FFN, HIDDEN)
    m.parallel_mode = None
    return m


@pytest.mark.parametrize("make_chunk, message", [
    (lambda: _swap(_te_chunk(), "linear_qkv", torch.nn.Linear(HIDDEN, QKV)),
     r"LoRA on linear_qkv: cannot wrap a Linear; .*ColumnParallelLinear.*"
     r"TELayerNormColumnParallelLinear.*--transformer-impl local or transformer_engine"),
    (lambda: _swap(_te_chunk(), "linear_qkv", TERowParallelLinear(HIDDEN, QKV)),
     "TERowParallelLinear is row-parallel but linear_qkv must be column-parallel"),
    (lambda: _swap(_te_chunk(), "linear_fc2", _expert_row()),
     "has parallel_mode None, expected 'row'; duplicated TE linears"),
    (lambda: _swap(_te_chunk(), "linear_qkv", TELayerNormColumnParallelLinear(
        HIDDEN, QKV, normalization="L2Norm")), "normalises with 'L2Norm'.*RMSNorm or LayerNorm"),
    (lambda: _swap(_te_chunk(), "linear_qkv", _no_eps()), r"lacks \['eps'\]"),
    (lambda: _te_chunk(mlp_cls=TEFusedMLP), "LoRA on mlp \\(TEFusedMLP\\).*never run"),
])
def test_unsupported_bases_are_refused_with_the_reason(make_chunk, message):
    chunk = make_chunk()
    with pytest.raises(LoRABaseError, match=message):
        attach_lora([chunk], SETTINGS)
    assert all(p.requires_grad for p in chunk.parameters())  # refused before changing anything
    assert not any(hasattr(lin, "lora") for lin in _linears(chunk).values())


def test_local_gather_output_is_refused():
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=2,
                            use_cpu_initialization=True)
    base = ColumnParallelLinear(HIDDEN, QKV, config=cfg, init_method=torch.nn.init.normal_,
                                bias=False, gather_output=True)
    with pytest.raises(LoRABaseError, match="gathers its output"):
        add_adapter(base, "linear_qkv", SETTINGS)


# ---------------------------------------------------------------- checkpoints across specs
def test_adapter_checkpoints_load_under_either_spec(tmp_path):
    """Adapter tensors keep one name under both specs (the TE <-> local renames touch norms
    only), so a LoRA run saved with one spec resumes with the other."""
    impls = {"te": LayerImpl("te", "te"), "local": LayerImpl("local", "sdpa")}
    chunks = {"te": _te_chunk(), "local": _local_chunk()}
    saved = {}
    for spec, chunk in chunks.items():
        attach_lora([chunk], SETTINGS)
        _random_adapters(chunk, seed={"te": 1, "local": 2}[spec])
        state = adapter_state_dict(impls[spec].model_to_checkpoint(chunk.state_dict()))
        saved[spec] = {k: v.clone() for k, v in state.items()}  # not views of the parameters
    names = sorted(f"decoder.layers.0.{p}.{n}.lora.{m}" for p, n in TARGETS for m in "AB")
    assert sorted(saved["te"]) == sorted(saved["local"]) == names
    for impl in impls.values():
        assert sorted(impl.checkpoint_to_model(saved["te"])) == names

    meta = CheckpointMetadata(architecture="LlamaForCausalLM", hf_config={},
                              layout=ParallelLayout(), make_vocab_size_divisible_by=128,
                              padded_vocab_size=256, params_dtype="float32")
    for src, dst in (("local", "te"), ("te", "local")):
        assert not torch.equal(saved[src][names[0]], saved[dst][names[0]])
        iter_dir = tmp_path / f"{src}_run" / "iter_0000001"
        save_rank_state(iter_dir, meta.layout, 0, 0, {meta.layout.model_key(0): saved[src]})
        load_adapters([chunks[dst]], iter_dir, meta)
        loaded = {n: p for n, p in chunks[dst].named_parameters() if is_adapter_name(n)}
        for n in names:
            torch.testing.assert_close(loaded[n], saved[src][n], rtol=0, atol=0, msg=n)
