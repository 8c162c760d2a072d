"""Mixture-of-Experts logits from converted checkpoints equal transformers' (fp32, gloo), for
every MoE family, with experts split over 2 and 4 ranks, with TP, PP and virtual pipeline
stages, under both the grouped_mm and the sequential experts implementations, both token
dispatchers; and two negative controls show the test can tell a wrong router setting. One
4-rank launch runs every case."""

import json
from pathlib import Path

import pytest

from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.runtime.layout import ParallelLayout
from sft_testing import ARCHITECTURES, run_torchrun

WORKER = Path(__file__).with_name("moe_parity_worker.py")
ATOL = 1e-4
MOE = [a for a in ARCHITECTURES if get_architecture(a).moe is not None]
LAYOUTS = {"EP2": ParallelLayout(1, 1, ep=2), "TP2EP2": ParallelLayout(2, 1, ep=2),
           "PP2EP2": ParallelLayout(1, 2, ep=2), "EP4": ParallelLayout(1, 1, ep=4),
           "PP2VPP2EP2": ParallelLayout(1, 2, 2, ep=2)}


@pytest.mark.xdist_group("multiprocess")
def test_moe_logits_match_transformers(tiny_hf_models, tmp_path):
    cases = []
    for layout_name, layout in LAYOUTS.items():
        for arch in MOE:
            if layout.vpp and get_architecture(arch).tiny_config["num_hidden_layers"] < 4:
                continue
            ckpt = tmp_path / f"{arch}_{layout_name}"
            convert_hf_to_megatron(tiny_hf_models[arch], ckpt,
                                   ConvertOptions(layout=layout, progress=False))
            hf = str(tiny_hf_models[arch])
            for experts in (("grouped_mm", "sequential") if layout_name in ("EP2", "TP2EP2",
                                                                           "PP2EP2")
                            else ("grouped_mm",)):
                cases.append({"name": f"{arch}/{layout_name}/{experts}", "ckpt": str(ckpt),
                              "hf": hf, "experts": experts})
            if layout_name == "EP2":
                cases.append({"name": f"{arch}/{layout_name}/allgather", "ckpt": str(ckpt),
                              "hf": hf, "experts": "grouped_mm",
                              "overrides": {"moe_token_dispatcher_type": "allgather"}})
    ep2 = {a: str(tmp_path / f"{a}_EP2") for a in MOE}
    controls = {  # a wrong setting must be seen
        "control/Qwen2-MoE with the shared-expert gate weight zeroed": dict(
            ckpt=ep2["Qwen2MoeForCausalLM"], hf=str(tiny_hf_models["Qwen2MoeForCausalLM"]),
            zero="shared_experts.gate_weight"),
        "control/Qwen3-MoE softmax before top-k (not renormalised)": dict(
            ckpt=ep2["Qwen3MoeForCausalLM"], hf=str(tiny_hf_models["Qwen3MoeForCausalLM"]),
            overrides={"moe_router_pre_softmax": True})}
    for name, c in controls.items():
        cases.insert(1, {"name": name, "experts": "grouped_mm", **c})  # runs with EP2
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "results.json"
    proc = run_torchrun(4, WORKER, str(tmp_path / "cases.json"), str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(out.read_text())
    assert set(results) == {c["name"] for c in cases}
    for name, r in results.items():
        assert r["ref_abs_max"] > 0.1, f"{name}: degenerate reference logits"
        if name.startswith("control/"):
            assert r["max_abs_diff"] > 1e-3, f"{name} should not match: {r}"
        else:
            assert r["max_abs_diff"] <= ATOL, f"{name}: {r}"
    print(json.dumps({k: f"{v['max_abs_diff']:.1e}" for k, v in results.items()}, indent=1))
