"""DeepSeek-V3's multi-token-prediction layer (``num_nextn_predict_layers``, the release's
``model.layers.61.*``) is not converted, and the converter says so; export puts it back from
the HF reference bit for bit, so the export is as complete as the release, or says it cannot
and writes ``num_nextn_predict_layers: 0``."""

import json

import torch
from safetensors.torch import load_file, save_file

from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
from megatron.sft.bridge.random_hf_model import make_random_hf_model
from megatron.sft.runtime.layout import ParallelLayout


def test_mtp_layer_is_skipped_on_convert_and_put_back_on_export(tmp_path):
    hf = make_random_hf_model("DeepseekV3ForCausalLM", tmp_path / "hf", seed=4)
    state = load_file(str(hf / "model.safetensors"))
    config = json.loads((hf / "config.json").read_text())
    mtp = config["num_hidden_layers"]  # the layer after the decoder, as 61 is in the release
    gen = torch.Generator().manual_seed(0)
    extra = {f"model.layers.{mtp}.{n}": torch.randn(s, generator=gen) for n, s in (
        ("enorm.weight", (64,)), ("hnorm.weight", (64,)), ("eh_proj.weight", (64, 128)),
        ("shared_head.norm.weight", (64,)), ("mlp.gate.e_score_correction_bias", (8,)))}
    save_file({**state, **extra}, str(hf / "model.safetensors"), metadata={"format": "pt"})
    config["num_nextn_predict_layers"] = 1
    (hf / "config.json").write_text(json.dumps(config))
    notes = []
    convert_hf_to_megatron(hf, tmp_path / "ckpt", ConvertOptions(
        layout=ParallelLayout(1, 2, ep=2), progress=False, log=notes.append))
    assert any(f"model.layers.{mtp}.* are not converted" in n for n in notes), notes
    export_megatron_to_hf(tmp_path / "ckpt", tmp_path / "out", hf,
                          ExportOptions(progress=False, log=notes.append))
    assert any("put back unchanged" in n for n in notes), notes
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(got) == sorted({**state, **extra})
    for name, t in {**state, **extra}.items():
        assert torch.equal(got[name], t), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())[
        "num_nextn_predict_layers"] == 1
    # without a reference holding the layer: said, and the config no longer claims it
    export_megatron_to_hf(tmp_path / "ckpt", tmp_path / "bare", None,
                          ExportOptions(progress=False, log=notes.append))
    assert any("no HF reference holding those layers" in n for n in notes), notes
    assert json.loads((tmp_path / "bare" / "config.json").read_text())[
        "num_nextn_predict_layers"] == 0
    assert not any(n.startswith(f"model.layers.{mtp}.")
                   for n in load_file(str(tmp_path / "bare" / "model.safetensors")))
