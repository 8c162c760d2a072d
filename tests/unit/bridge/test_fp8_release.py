"""DeepSeek-V3's block-FP8 release format, written by our own quantiser on a tiny random model:
conversion (TP2 x EP2) and ``--load HF_DIR`` read exactly the dequantised weights
(``fp8.float() * scale`` per block, computed here block by block with plain loops), export
writes them in the run's dtype without ``quantization_config``, and a malformed release is
refused by name before anything is written."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
from megatron.sft.bridge.random_hf_model import make_random_hf_model
from megatron.sft.bridge.reader import CoverageError
from megatron.sft.runtime.layout import ParallelLayout

#: small blocks, so the tiny model's weights span several, with cut edges (kv_a: 40 rows)
BLOCK = (16, 16)
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def quantise_block_fp8(w: torch.Tensor, block=BLOCK):
    """The release's layout: ``(fp8 weight, float32 scale_inv)``, one scale per block =
    ``amax / 448`` (so ``fp8 * scale`` is the weight to fp8 precision)."""
    rows, cols = w.shape
    br, bc = block
    scale = torch.zeros(-(-rows // br), -(-cols // bc))
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float()
            s = blk.abs().max().clamp(min=1e-12) / FP8_MAX
            scale[i, j] = s
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def dequantise_by_blocks(q, scale, block=BLOCK):
    """The reference: each block's fp8 values in fp32 times its scale."""
    out = torch.zeros(q.shape)
    br, bc = block
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = \
                q[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float() * scale[i, j]
    return out


def _quantised(name: str, t: torch.Tensor) -> bool:
    """What the release quantises: the decoder's 2-D projection weights (not the router,
    norms, embeddings or head)."""
    return t.dim() == 2 and ".layers." in name and name.endswith("proj.weight")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """``(fp8 HF dir, {name: the dequantised weights the model means})``."""
    root = tmp_path_factory.mktemp("fp8")
    hf = make_random_hf_model("DeepseekV3ForCausalLM", root / "bf16", seed=3)
    state = load_file(str(hf / "model.safetensors"))
    out, meant = {}, {}
    for name, t in state.items():
        if _quantised(name, t):
            q, s = quantise_block_fp8(t)
            out[name], out[name + "_scale_inv"] = q, s
            meant[name] = dequantise_by_blocks(q, s)
        else:
            out[name] = meant[name] = t
    fp8 = root / "fp8"
    fp8.mkdir()
    save_file(out, str(fp8 / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((hf / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (fp8 / "config.json").write_text(json.dumps(config))
    shutil.copy(hf / "generation_config.json", fp8)
    assert sum(t.dtype == torch.float8_e4m3fn for t in out.values()) > 20
    return fp8, meant


def test_convert_and_export_give_the_dequantised_model(release, tmp_path):
    fp8, meant = release
    ckpt, exported = tmp_path / "ckpt", tmp_path / "export"
    notes = []
    convert_hf_to_megatron(fp8, ckpt, ConvertOptions(layout=ParallelLayout(2, 1, ep=2),
                                                     params_dtype=torch.float32,
                                                     progress=False, log=notes.append))
    assert any("block-FP8 weights are dequantised" in n for n in notes), notes
    export_megatron_to_hf(ckpt, exported, fp8, ExportOptions(progress=False,
                                                             log=notes.append))
    assert any("quantization_config" in n for n in notes), notes
    got = load_file(str(exported / "model.safetensors"))
    assert sorted(got) == sorted(meant)
    for name, want in meant.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], want.float()), name
    config = json.loads((exported / "config.json").read_text())
    assert "quantization_config" not in config
    assert config.get("torch_dtype", config.get("dtype")) == "float32"


def test_load_hf_dir_reads_the_dequantised_shards(release, tmp_path):
    """``--load FP8_DIR`` (rank_shard, row ranges dequantised with their scale rows) gives
    each rank the converter's files bit for bit, at TP2 x PP2, PP2 x VPP2 and TP2 x EP2."""
    from test_hf_direct_load import _check_equal_to_converter

    fp8, _ = release
    assert _check_equal_to_converter(fp8, tmp_path, on_disk=True) > 0


def test_a_malformed_release_is_refused_before_anything_is_written(release, tmp_path):
    fp8, _ = release
    bad = tmp_path / "bad"
    shutil.copytree(fp8, bad)
    state = load_file(str(bad / "model.safetensors"))
    name = next(n for n in state if n.endswith("_scale_inv"))
    state[name] = state[name][:-1]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CoverageError, match="weight_scale_inv has shape"):
        convert_hf_to_megatron(bad, tmp_path / "out", ConvertOptions(progress=False))
    assert not (tmp_path / "out").exists()
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"].pop("weight_block_size")
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CoverageError, match="without weight_block_size"):
        convert_hf_to_megatron(bad, tmp_path / "out", ConvertOptions(progress=False))
