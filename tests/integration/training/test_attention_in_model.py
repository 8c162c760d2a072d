"""Attention backends inside the real model under gloo: ``sdpa`` and ``dense`` give
transformers' logits on packed rows (each document run through HF on its own) and the same
parameter gradients, at TP1, TP2 (heads split) and PP2; GQA and MHA, q/k/v bias, q/k norms,
Mistral's sliding window, and TP larger than the number of KV heads."""

import json
from pathlib import Path

import pytest

from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.runtime.layout import ParallelLayout
from megatron.sft.bridge.random_hf_model import make_random_hf_model
from sft_testing import run_torchrun

WORKER = Path(__file__).with_name("attention_worker.py")
SEQ = 48
#: a 1-token document, uneven ones, a document filling its row, and a row ending in padding
ROWS = [[1, 20, 27], [48], [13, 1, 19]]
#: (name, architecture, config overrides). The Mistral window (8) is shorter than its documents.
MODELS = [
    ("qwen2-gqa-bias", "Qwen2ForCausalLM", {}),
    ("qwen3-qk-norm", "Qwen3ForCausalLM", {}),
    ("mistral-window", "MistralForCausalLM", {"sliding_window": 8}),
]


def _run(tmp_path, layout, models, backends=("sdpa", "dense")):
    pairs = []
    for name, arch, overrides in models:
        hf = make_random_hf_model(arch, tmp_path / f"hf-{name}", seed=len(name),
                                  overrides=overrides)
        ckpt = tmp_path / f"mg-{name}"
        convert_hf_to_megatron(hf, ckpt, ConvertOptions(layout=layout, progress=False))
        pairs.append({"name": name, "ckpt": str(ckpt), "hf": str(hf)})
    spec = {"pairs": pairs, "backends": list(backends), "rows": ROWS, "seq_length": SEQ,
            "out": str(tmp_path / "result.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = run_torchrun(layout.tp * layout.pp, WORKER, str(tmp_path / "spec.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {name: json.loads((tmp_path / f"result.{name}.json").read_text())
            for name, _, _ in models}


def _check(results):
    for name, r in results.items():
        assert r["same_grad_keys"], name
        assert r["logits_abs_max"] > 0.1, f"{name}: degenerate reference"
        for backend, diff in r["logits_max_abs_diff"].items():
            assert diff <= 1e-5 * max(1.0, r["logits_abs_max"]), (name, backend, r)
        assert r["grad_abs_max"] > 1e-3, f"{name}: no gradient reached the parameters"
        assert r["grad_max_abs_diff"] <= 1e-5 * max(1.0, r["grad_abs_max"]), (name, r)


#: One KV head at TP2: megatron-core gives the KV head to both ranks.
ONE_KV_HEAD = ("llama-one-kv-head", "LlamaForCausalLM", {"num_key_value_heads": 1})


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_sdpa_equals_dense_equals_transformers(tp, pp, tmp_path):
    models = MODELS + ([ONE_KV_HEAD] if tp == 2 else [])  # TP larger than the KV heads
    _check(_run(tmp_path, ParallelLayout(tp, pp), models))


def test_tp_larger_than_kv_heads_exports_and_reshards_exactly(tmp_path):
    from safetensors.torch import load_file

    from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
    from megatron.sft.bridge.reshard import reshard_checkpoint

    hf = make_random_hf_model("LlamaForCausalLM", tmp_path / "hf", seed=5,
                              overrides={"num_key_value_heads": 1})
    convert_hf_to_megatron(hf, tmp_path / "tp2", ConvertOptions(layout=ParallelLayout(2, 1),
                                                                progress=False))
    reshard_checkpoint(tmp_path / "tp2", tmp_path / "tp4", ParallelLayout(4, 1), progress=False)
    source = load_file(hf / "model.safetensors")
    for ckpt in ("tp2", "tp4"):
        out = export_megatron_to_hf(tmp_path / ckpt, tmp_path / f"export-{ckpt}", hf,
                                    ExportOptions(progress=False))
        exported = load_file(out / "model.safetensors")
        assert set(exported) == set(source)
        assert all(exported[k].equal(source[k]) for k in source), ckpt
