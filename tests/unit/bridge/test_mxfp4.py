"""GPT-OSS's MXFP4 release layout: our dequantiser equals transformers' on our quantiser's
output, and a checkpoint written in the released layout (``*_blocks``/``*_scales``,
``quantization_config``) converts, and loads with ``--load HF_DIR``, to exactly what the
dequantised model converts to; export writes bf16 without ``quantization_config``."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
from megatron.sft.bridge.mxfp4 import Mxfp4Error, Mxfp4Source, dequantize_mxfp4, quantize_mxfp4
from megatron.sft.bridge.random_hf_model import make_random_hf_model
from megatron.sft.bridge.safetensors_io import SafetensorsSource
from megatron.sft.runtime.layout import ParallelLayout

ARCH = "GptOssForCausalLM"


def test_dequantiser_equals_transformers_on_our_quantisers_layout():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    w = torch.randn(3, 64, 48, generator=torch.Generator().manual_seed(0)) * 0.05  # [E, C, R]
    w[0, :32, 0] = torch.tensor([6.0, -12.0, 0.25] + [0.0] * 29)  # exact values, one group
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (3, 48, 2, 16) and scales.shape == (3, 48, 2)
    ours = dequantize_mxfp4(blocks, scales)
    assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))
    assert ours[0, :3, 0].tolist() == [6.0, -12.0, 0.0]  # 0.25 rounds to 0 at scale 2
    # a quantiser worth the name: within half an E2M1 step of each group's scale
    assert (ours.float() - w).abs().max() < w.abs().max() / 4
    # the byte order: low nibble first (0x2F, scale 128 -> -12, 2)
    assert dequantize_mxfp4(torch.tensor([[[[0x2F] + [0] * 15]]], dtype=torch.uint8),
                            torch.tensor([[[128]]], dtype=torch.uint8))[0, :2, 0].tolist() \
        == [-12.0, 2.0]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A random GPT-OSS model, its experts quantised into the released layout; and the same
    model with the dequantised experts (what conversion must equal)."""
    tmp_path = tmp_path_factory.mktemp("mxfp4")
    hf = make_random_hf_model(ARCH, tmp_path / "hf", dtype=torch.bfloat16)
    state = load_file(hf / "model.safetensors")
    released, dequantised = {}, {}
    for name, t in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(t.float())
            released[name + "_blocks"], released[name + "_scales"] = blocks, scales
            dequantised[name] = dequantize_mxfp4(blocks, scales)
        else:
            released[name] = dequantised[name] = t
    out = {}
    for kind, tensors in (("release", released), ("dequantised", dequantised)):
        d = tmp_path / kind
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((hf / "config.json").read_text())
        if kind == "release":
            cfg["quantization_config"] = {"quant_method": "mxfp4",
                                          "modules_to_not_convert": ["model.layers.*.self_attn"]}
        (d / "config.json").write_text(json.dumps(cfg))
        out[kind] = d
    return out


def _rank_files(ckpt):
    return {p.name: torch.load(p / "model_optim_rng.pt", weights_only=True)["model"]
            for p in sorted((ckpt / "iter_0000001").glob("mp_rank_*"))}


def test_release_layout_converts_to_the_dequantised_model(release, tmp_path):
    d = release
    layout = ParallelLayout(1, 1, ep=2)
    for kind in d:
        convert_hf_to_megatron(d[kind], tmp_path / f"mg-{kind}",
                               ConvertOptions(layout=layout, progress=False))
    a, b = _rank_files(tmp_path / "mg-release"), _rank_files(tmp_path / "mg-dequantised")
    assert a.keys() == b.keys()
    for f in a:
        assert a[f].keys() == b[f].keys()
        for n in a[f]:
            assert a[f][n].dtype == b[f][n].dtype and torch.equal(a[f][n], b[f][n]), (f, n)
    export_megatron_to_hf(tmp_path / "mg-release", tmp_path / "out", d["release"],
                          ExportOptions(progress=False))
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert "quantization_config" not in cfg
    exported, want = load_file(tmp_path / "out/model.safetensors"), \
        load_file(d["dequantised"] / "model.safetensors")
    assert exported.keys() == want.keys()
    assert all(torch.equal(exported[n], want[n]) for n in want)


def test_direct_load_reads_the_release_as_converted(release, tmp_path):
    from megatron.sft.bridge.hf_source import hf_checkpoint_metadata
    from megatron.sft.bridge.rank_shard import rank_state

    d = release
    layout = ParallelLayout(1, 1, ep=2)
    convert_hf_to_megatron(d["dequantised"], tmp_path / "mg",
                           ConvertOptions(layout=layout, progress=False))
    files = _rank_files(tmp_path / "mg")
    from megatron.sft.bridge.architectures import shape_of
    from megatron.sft.bridge.rules import ShardContext

    meta, source = hf_checkpoint_metadata(d["release"], layout, log=lambda *a: None)
    spec, shape = shape_of(meta.hf_config)
    ctx = ShardContext(shape, layout.tp, meta.padded_vocab_size)
    for ep in range(2):
        got = rank_state(source, spec, shape, layout, ctx, 0, 0, ep,
                         getattr(torch, meta.params_dtype))["model"]
        want = files[f"mp_rank_00_00{ep}"]
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in want)


def test_unpaired_tensors_are_refused(tmp_path):
    save_file({"x_blocks": torch.zeros(1, 2, 1, 16, dtype=torch.uint8)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(Mxfp4Error, match="x_blocks has no x_scales"):
        Mxfp4Source(SafetensorsSource(tmp_path))
