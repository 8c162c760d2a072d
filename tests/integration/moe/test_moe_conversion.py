"""Mixture-of-Experts conversion: HF -> Megatron (expert-parallel files) -> HF is bit-identical
for every MoE family, from either HF expert form; every expert is read exactly once; bad input
is refused with the names before anything is written. Pure CPU, no process group."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.bridge.convert import ConvertOptions, CoverageError, convert_hf_to_megatron
from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
from megatron.sft.bridge.model_shape import UnsupportedModelError
from megatron.sft.bridge.random_hf_model import make_random_hf_model
from megatron.sft.bridge.reshard import reshard_checkpoint
from megatron.sft.bridge.safetensors_io import SafetensorsSource
from megatron.sft.runtime.layout import LayoutError, ParallelLayout
from sft_testing import ARCHITECTURES

MOE = [a for a in ARCHITECTURES if get_architecture(a).moe is not None]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """``{(arch, form): HF dir}``: the same random weights (one seed) saved per expert (as
    ``save_pretrained`` writes) and fused (as transformers holds them in memory)."""
    root = tmp_path_factory.mktemp("moe_hf")
    return {(arch, form): make_random_hf_model(arch, root / f"{arch}-{form}", seed=3,
                                               fused_experts=form == "fused")
            for arch in MOE for form in ("per-expert", "fused")}


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_identical(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("form", ["per-expert", "fused"])
def test_roundtrip_through_expert_parallel_files_is_bit_identical(arch, form, moe_models,
                                                                  tmp_path):
    src = moe_models[(arch, form)]
    fused_only = get_architecture(arch).export_fused_experts  # GPT-OSS saves no other form
    assert (".experts.gate_up_proj" in " ".join(_tensors(src))) == (form == "fused" or fused_only)
    convert_hf_to_megatron(src, tmp_path / "mg", ConvertOptions(
        layout=ParallelLayout(1, 1, ep=2), progress=False))
    files = sorted(p.name for p in (tmp_path / "mg" / "iter_0000001").glob("mp_rank_*"))
    assert files == ["mp_rank_00_000", "mp_rank_00_001"]  # Megatron-LM's names with EP
    e0, e1 = (torch.load(tmp_path / "mg/iter_0000001" / f / "model_optim_rng.pt",
                         weights_only=True)["model"] for f in files)
    # Both EP ranks hold the dense tensors, each its own half of the experts (local indices).
    dense = [n for n in e0 if ".local_experts." not in n]
    assert dense and all(torch.equal(e0[n], e1[n]) for n in dense)
    experts = get_architecture(arch).shape(json.loads((src / "config.json").read_text())).moe
    assert {n.split(".local_experts.")[1].split(".")[0] for n in e0 if ".local_experts." in n} \
        == {str(e) for e in range(experts.num_experts // 2)}
    export_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", src, ExportOptions(progress=False))
    # Export writes what save_pretrained writes (one tensor per expert): from the fused form
    # that is the per-expert checkpoint of the same weights.
    _assert_identical(_tensors(moe_models[(arch, "per-expert")]), _tensors(tmp_path / "hf"))


@pytest.mark.parametrize("arch", MOE)
def test_tp_pp_ep_and_reshard_roundtrips(arch, moe_models, tmp_path):
    src = moe_models[(arch, "fused")]
    convert_hf_to_megatron(src, tmp_path / "a", ConvertOptions(
        layout=ParallelLayout(2, 2, ep=2), progress=False))
    assert len(list((tmp_path / "a/iter_0000001").glob("mp_rank_*_*_*"))) == 8
    reshard_checkpoint(tmp_path / "a", tmp_path / "b", ParallelLayout(2, 1, ep=4 if arch ==
                       "Qwen3MoeForCausalLM" else 1), progress=False)
    export_megatron_to_hf(tmp_path / "b", tmp_path / "hf", src, ExportOptions(progress=False))
    _assert_identical(_tensors(moe_models[(arch, "per-expert")]), _tensors(tmp_path / "hf"))


def test_whole_experts_with_tp_have_megatron_lms_files_and_roundtrip(moe_models, tmp_path):
    """ETP=1 with TP=2: one file per EP rank ``e``, named by TP rank ``e mod 2`` (Megatron-LM's
    files, written by its expert-data-parallel rank 0), with that TP rank's dense shard (equal
    to the TP=ETP checkpoint's) and EP rank ``e``'s experts whole (its TP shards joined).
    Export, and reshard to TP=ETP, are bit-identical."""
    src = moe_models[("Qwen3MoeForCausalLM", "fused")]
    whole, split = ParallelLayout(2, 2, ep=4, etp=1), ParallelLayout(2, 2, ep=4)
    for name, layout in (("whole", whole), ("split", split)):
        convert_hf_to_megatron(src, tmp_path / name, ConvertOptions(layout=layout,
                                                                    progress=False))
    it = "iter_0000001"
    files = sorted(p.name for p in (tmp_path / "whole" / it).glob("mp_rank_*"))
    assert files == sorted(f"mp_rank_{e % 2:02d}_{p:03d}_{e:03d}" for p in (0, 1)
                           for e in range(4))
    assert sorted(whole.rank_dir_name(*r) for r in whole.file_ranks()) == files

    def state(name, t, p, e):
        return torch.load(tmp_path / name / it / f"mp_rank_{t:02d}_{p:03d}_{e:03d}" /
                          "model_optim_rng.pt", weights_only=True)["model"]

    for t, p, e in whole.file_ranks():
        mine, shards = state("whole", t, p, e), [state("split", r, p, e) for r in (0, 1)]
        assert sorted(mine) == sorted(shards[t])
        for n, tensor in mine.items():
            if ".local_experts." not in n:
                assert torch.equal(tensor, shards[t][n]), n  # TP rank t's dense shard
            elif "linear_fc2" in n:  # row-parallel: TP shards are column blocks
                assert torch.equal(tensor, torch.cat([s[n] for s in shards], dim=1)), n
            else:  # gate/up: each TP shard holds its gate rows, then its up rows
                halves = [s[n].chunk(2) for s in shards]
                assert torch.equal(tensor, torch.cat([h[0] for h in halves]
                                                     + [h[1] for h in halves])), n
    # export, and reshard to TP=ETP at other sizes, from the whole-expert files
    reshard_checkpoint(tmp_path / "whole", tmp_path / "back", ParallelLayout(2, 1, ep=2),
                       progress=False)
    per_expert = _tensors(moe_models[("Qwen3MoeForCausalLM", "per-expert")])
    for name in ("whole", "back"):
        export_megatron_to_hf(tmp_path / name, tmp_path / f"hf_{name}", src,
                              ExportOptions(progress=False))
        _assert_identical(per_expert, _tensors(tmp_path / f"hf_{name}"))


@pytest.mark.parametrize("form", ["per-expert", "fused"])
def test_every_source_byte_is_read_once(form, moe_models, tmp_path, monkeypatch):
    reads = []
    read, read_range = SafetensorsSource.read, SafetensorsSource.read_range
    monkeypatch.setattr(SafetensorsSource, "read",
                        lambda self, n: reads.append((n, None)) or read(self, n))
    monkeypatch.setattr(SafetensorsSource, "read_range",
                        lambda self, n, start, count, shape: reads.append((n, start))
                        or read_range(self, n, start, count, shape))
    src = moe_models[("Qwen3MoeForCausalLM", form)]
    convert_hf_to_megatron(src, tmp_path / "mg", ConvertOptions(
        layout=ParallelLayout(2, 2, ep=4), progress=False))
    assert len(reads) == len(set(reads)), "a tensor (or expert slice) was read twice"
    nbytes = {n: SafetensorsSource(src).meta(n).numel() for n, _ in reads}
    assert {n for n, _ in reads} == set(SafetensorsSource(src).names())
    if form == "fused":  # each expert's slice of a fused tensor is read on its own
        assert sum(start is not None for _, start in reads) == 3 * 8 * 2 * 1 + 3 * 8
        assert all(v > 0 for v in nbytes.values())


def test_bad_expert_input_is_refused_before_anything_is_written(moe_models, tmp_path):
    def convert(src, layout=ParallelLayout(1, 1, ep=2)):
        convert_hf_to_megatron(src, tmp_path / "out", ConvertOptions(layout=layout,
                                                                     progress=False))

    per_expert, fused = (moe_models[("Qwen3MoeForCausalLM", f)] for f in ("per-expert", "fused"))
    with pytest.raises(LayoutError, match="EP=3 does not divide num_experts=8"):
        convert(per_expert, ParallelLayout(1, 1, ep=3))
    with pytest.raises(LayoutError, match="ETP=1 with TP=2 and EP=1: .*so EP must be a "
                                          "multiple of TP; use EP=2 or ETP=2"):
        convert(per_expert, ParallelLayout(2, 1, ep=1, etp=1))
    with pytest.raises(LayoutError, match="ETP=2 with TP=4: .*use ETP=4, ETP=1 or leave it"):
        convert(per_expert, ParallelLayout(4, 1, ep=2, etp=2))

    bad = tmp_path / "bad"
    shutil.copytree(per_expert, bad)
    t = _tensors(bad)
    del t["model.layers.2.mlp.experts.5.up_proj.weight"]
    t["model.layers.2.mlp.experts.8.up_proj.weight"] = torch.zeros(16, 32)  # a 9th expert
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CoverageError, match=r"missing 1 tensor\(s\): model.layers.2.mlp.experts"
                       r".5.up_proj.weight; unexpected 1 tensor\(s\): model.layers.2.mlp."
                       r"experts.8.up_proj.weight.*or fused as model.layers.{i}.mlp.experts"):
        convert(bad)

    shutil.rmtree(bad)
    shutil.copytree(fused, bad)
    t = _tensors(bad)
    t["model.layers.0.mlp.experts.gate_up_proj"] = t["model.layers.0.mlp.experts.gate_up_proj"][:7]
    t["model.layers.2.mlp.experts.3.down_proj.weight"] = torch.zeros(32, 16)  # both forms
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CoverageError, match=r"model.layers.0.mlp.experts.gate_up_proj has shape "
                       r"\(7, 32, 32\), expected \(8, 32, 32\).*model.layers.2.mlp.experts.3."
                       r"down_proj.weight is stored both on its own and in model.layers.2"):
        convert(bad)

    shutil.rmtree(bad)
    shutil.copytree(per_expert, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, scoring_func="sigmoid", n_group=4)))
    with pytest.raises(UnsupportedModelError, match=r"scoring_func='sigmoid' \(a non-softmax "
                       r"router score.*n_group=4 \(grouped, device-limited routing"):
        convert(bad)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]
