"""Megatron-core logits from converted checkpoints equal transformers' logits (fp32, gloo)."""

import json
from pathlib import Path

import pytest

from sft_testing import ARCHITECTURES, REPO, run_torchrun
from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.runtime.layout import ParallelLayout
from megatron.sft.bridge.reshard import reshard_checkpoint

WORKER = Path(__file__).with_name("parity_worker.py")
ATOL = 1e-4
#: Mixture-of-Experts families have their own launch, over expert-parallel layouts too
#: (tests/integration/moe/test_moe_parity.py): one per layout here would cost a launch each.
DENSE = [a for a in ARCHITECTURES if get_architecture(a).moe is None]

LAYOUTS = {
    "TP1PP1": ParallelLayout(1, 1),
    "TP2PP1": ParallelLayout(2, 1),
    "TP1PP2": ParallelLayout(1, 2),
    "TP2PP2": ParallelLayout(2, 2),
    "TP1PP2VPP2": ParallelLayout(1, 2, 2),
}


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_logits_match_transformers(layout_name, tiny_hf_models, tmp_path):
    layout = LAYOUTS[layout_name]
    pairs = []
    for arch in DENSE:
        ckpt = tmp_path / f"{arch}_{layout_name}"
        convert_hf_to_megatron(tiny_hf_models[arch], ckpt, ConvertOptions(layout=layout,
                                                                          progress=False))
        pairs.append({"name": arch, "ckpt": str(ckpt), "hf": str(tiny_hf_models[arch])})
    if layout_name == "TP1PP2":
        # Reshard TP2xPP1 -> TP1xPP2 must keep logits equal too.
        src = tmp_path / "qwen2_tp2pp1"
        convert_hf_to_megatron(tiny_hf_models["Qwen2ForCausalLM"], src,
                               ConvertOptions(layout=ParallelLayout(2, 1), progress=False))
        resharded = tmp_path / "qwen2_resharded_tp1pp2"
        reshard_checkpoint(src, resharded, ParallelLayout(1, 2), progress=False)
        pairs.append({"name": "resharded-Qwen2", "ckpt": str(resharded),
                      "hf": str(tiny_hf_models["Qwen2ForCausalLM"])})
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    out = tmp_path / "results.json"
    proc = run_torchrun(layout.tp * layout.pp, WORKER, str(tmp_path / "pairs.json"), str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {p["name"] for p in pairs}
    for name, r in results.items():
        assert r["shape"][-1] == json.loads((Path(dict((p["name"], p["hf"]) for p in pairs)[name])
                                             / "config.json").read_text())["vocab_size"]
        assert r["ref_abs_max"] > 0.1, f"{name}: degenerate reference logits"
        assert r["max_abs_diff"] <= ATOL, f"{name} {layout_name}: {r}"


@pytest.mark.xdist_group("multiprocess")
def test_parity_cli_passes_and_detects_a_wrong_model(tiny_hf_models, tmp_path):
    ckpt = tmp_path / "qwen3_tp2"
    convert_hf_to_megatron(tiny_hf_models["Qwen3ForCausalLM"], ckpt,
                           ConvertOptions(layout=ParallelLayout(2, 1), progress=False))
    tool = REPO / "tools" / "check_hf_parity.py"
    ok = run_torchrun(2, tool, "--load", str(ckpt), "--hf-model",
                      str(tiny_hf_models["Qwen3ForCausalLM"]))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "OK" in ok.stdout

    # Same architecture and shapes, different random weights: the check must fail.
    from megatron.sft.bridge.random_hf_model import make_random_hf_model

    other = make_random_hf_model("Qwen3ForCausalLM", tmp_path / "other", seed=99)
    bad = run_torchrun(2, tool, "--load", str(ckpt), "--hf-model", str(other))
    assert bad.returncode == 1
    assert "FAIL" in bad.stdout
