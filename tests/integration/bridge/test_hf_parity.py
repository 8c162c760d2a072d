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


def _parity_launch(names, tiny_hf_models, root):
    """Every dense architecture at each of the layouts ``names`` (same rank count), one
    launch; ``{layout name: {pair name: result}}``."""
    pairs = []
    for layout_name in names:
        layout = LAYOUTS[layout_name]
        for arch in DENSE:
            ckpt = root / f"{arch}_{layout_name}"
            convert_hf_to_megatron(tiny_hf_models[arch], ckpt, ConvertOptions(layout=layout,
                                                                              progress=False))
            pairs.append({"name": f"{layout_name}/{arch}", "ckpt": str(ckpt),
                          "hf": str(tiny_hf_models[arch])})
        if layout_name == "TP1PP2":
            # Reshard TP2xPP1 -> TP1xPP2 must keep logits equal too.
            src = root / "qwen2_tp2pp1"
            convert_hf_to_megatron(tiny_hf_models["Qwen2ForCausalLM"], src,
                                   ConvertOptions(layout=ParallelLayout(2, 1), progress=False))
            resharded = root / "qwen2_resharded_tp1pp2"
            reshard_checkpoint(src, resharded, ParallelLayout(1, 2), progress=False)
            pairs.append({"name": f"{layout_name}/resharded-Qwen2", "ckpt": str(resharded),
                          "hf": str(tiny_hf_models["Qwen2ForCausalLM"])})
    (root / "pairs.json").write_text(json.dumps(pairs))
    out = root / "results.json"
    world = max(LAYOUTS[n].tp * LAYOUTS[n].pp for n in names)
    proc = run_torchrun(world, WORKER, str(root / "pairs.json"), str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results, hf_dirs = json.loads(out.read_text()), {p["name"]: p["hf"] for p in pairs}
    by_layout = {n: {} for n in names}
    for name, r in results.items():
        layout_name, pair = name.split("/", 1)
        by_layout[layout_name][pair] = {**r, "hf": hf_dirs[name]}
    return by_layout


@pytest.fixture(scope="module")
def parity(tiny_hf_models, tmp_path_factory):
    """Two launches: the layouts that fit 2 ranks (TP1PP1 runs there as 2 data-parallel
    replicas), and TP2PP2 on 4."""
    out = {}
    for names in (["TP1PP1", "TP2PP1", "TP1PP2", "TP1PP2VPP2"], ["TP2PP2"]):
        out.update(_parity_launch(names, tiny_hf_models, tmp_path_factory.mktemp("parity")))
    return out


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_logits_match_transformers(layout_name, parity):
    results = parity[layout_name]
    expected = set(DENSE) | ({"resharded-Qwen2"} if layout_name == "TP1PP2" else set())
    assert set(results) == expected
    for name, r in results.items():
        assert r["shape"][-1] == json.loads((Path(r["hf"]) / "config.json").read_text()
                                            )["vocab_size"]
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
