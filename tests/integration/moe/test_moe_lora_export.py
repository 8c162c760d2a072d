"""A LoRA run of a Mixture-of-Experts model exports as a PEFT adapter that peft itself loads onto
the transformers model and that computes the merged export (logits within 1e-4): attention,
dense layers' MLPs, the shared expert and every routed expert (its own A/B, in peft's fused
form on transformers 5's 3-D expert parameters), for Qwen2-MoE, Qwen3-MoE and Mixtral at EP2.
peft 0.21 rewrites Qwen3-MoE's ``gate_proj``/``up_proj``/``down_proj`` target modules into the
fused expert parameters, so an adapter naming them as modules leaves the dense MLPs at the base
weights (the bug this guards: the Qwen3-MoE case fails that way without it). Resharding the run
to another EP (and TP) keeps it the same model; what the PEFT form cannot express is refused
with nothing written.

The runs are written here directly (random non-zero adapters on an EP2 base, the files a LoRA
run saves), which is much cheaper than training one. Pure CPU, no process group.
"""

import json

import pytest
import torch

from megatron.sft.bridge.checkpoint_io import (
    CHECKPOINT_VERSION,
    iteration_dir,
    load_rank_state,
    partial_iteration_dir,
    publish_iteration,
    read_metadata,
    save_rank_state,
    write_metadata,
)
from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
from megatron.sft.bridge.random_hf_model import make_random_hf_model
from megatron.sft.lora.merge import open_checkpoint
from megatron.sft.lora.peft_export import export_lora_adapter
from megatron.sft.lora.reshard import reshard_any
from megatron.sft.lora.run_format import LoRACheckpointInfo, base_fingerprint, write_lora_info
from megatron.sft.lora.settings import LoRASettings
from megatron.sft.runtime.layout import ParallelLayout

SETTINGS = LoRASettings(4, 8.0, routed_experts=True)
#: the Megatron modules each target adapts, written out here (not taken from the code under test)
TARGETS = {"linear_qkv": "self_attention", "linear_proj": "self_attention",
           "linear_fc1": "mlp", "linear_fc2": "mlp"}


def write_lora_run(base, run, iteration=3, seed=3):
    """A LoRA run on ``base`` (TP1, any EP) with A, B ~ N(0, 0.1) on every target the base has
    a weight for (a MoE layer: its shared expert's and each local routed expert's), the dense
    adapters the same in every expert-parallel rank's file and each expert's its own, as
    training saves them. Returns the run and ``{ep_rank: adapters}``."""
    base_iter = iteration_dir(base)
    meta = read_metadata(base_iter)
    layout = meta.layout
    g = torch.Generator().manual_seed(seed)
    dense, per_rank = {}, {}
    for ep in range(layout.ep):
        weights = load_rank_state(base_iter, layout, 0, 0, ep)["model"]
        per_rank[ep] = {}
        for name, w in sorted(weights.items()):
            prefix = name[: -len(".weight")]
            if not any(prefix.endswith("." + t) for t in TARGETS):
                continue
            routed = ".local_experts." in name
            if not routed and prefix + ".lora.A" in dense:  # the same on every EP rank
                per_rank[ep].update({k: v for k, v in dense.items() if k.startswith(prefix)})
                continue
            a = torch.randn(SETTINGS.rank, w.shape[1], generator=g) * 0.1
            b = torch.randn(w.shape[0], SETTINGS.rank, generator=g) * 0.1
            per_rank[ep].update({prefix + ".lora.A": a, prefix + ".lora.B": b})
            if not routed:
                dense.update({prefix + ".lora.A": a, prefix + ".lora.B": b})
    partial = partial_iteration_dir(run, iteration)
    for ep, adapters in per_rank.items():
        save_rank_state(partial, layout, 0, 0, {"checkpoint_version": CHECKPOINT_VERSION,
                                                "iteration": iteration, "model": adapters,
                                                "optimizer": {"state": {}}}, ep)
    write_metadata(partial, meta)
    write_lora_info(partial, LoRACheckpointInfo(SETTINGS, str(base.resolve()), 1,
                                                base_fingerprint(base_iter)))
    publish_iteration(run, iteration)
    return run, per_rank


@pytest.mark.parametrize("arch", ["Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                                  "MixtralForCausalLM"])
def test_peft_loads_the_moe_adapter_and_matches_the_merged_export(arch, tmp_path):
    hf = make_random_hf_model(arch, tmp_path / "hf", seed=5)
    base = tmp_path / "base"
    convert_hf_to_megatron(hf, base, ConvertOptions(layout=ParallelLayout(1, 1, ep=2),
                                                    progress=False))
    run, per_rank = write_lora_run(base, tmp_path / "run")
    names = set(per_rank[0]) | set(per_rank[1])
    # dense layers' MLP (Qwen), the shared expert (Qwen2-MoE) and the routed experts adapted
    assert any(".mlp.linear_fc1.lora.A" in n for n in names) == (arch != "MixtralForCausalLM")
    assert any(".shared_experts." in n for n in names) == (arch == "Qwen2MoeForCausalLM")
    assert any(".local_experts.1.linear_fc2.lora.B" in n for n in per_rank[1])
    export_megatron_to_hf(open_checkpoint(run), tmp_path / "merged", hf,
                          ExportOptions(progress=False))
    adapter = export_lora_adapter(run, tmp_path / "peft", hf)
    _assert_peft_gives_merged(hf, tmp_path / "merged", adapter)

    # reshard to EP1 x TP2 (and back to EP2 from there): the same adapter and merged model
    out = tmp_path / "ep1tp2"
    reshard_any(run, out, ParallelLayout(2, 1), progress=False)
    export_megatron_to_hf(open_checkpoint(out), tmp_path / "merged2", hf,
                          ExportOptions(progress=False))
    for name, t in _hf_tensors(tmp_path / "merged").items():
        torch.testing.assert_close(_hf_tensors(tmp_path / "merged2")[name], t, rtol=0,
                                   atol=1e-6, msg=name)
    back = tmp_path / "ep2"
    reshard_any(out, back, ParallelLayout(1, 1, ep=2), progress=False)
    for ep in (0, 1):
        got = load_rank_state(iteration_dir(back), ParallelLayout(1, 1, ep=2), 0, 0, ep)["model"]
        assert sorted(got) == sorted(per_rank[ep])
        assert all(torch.equal(got[k], per_rank[ep][k]) for k in got)


def test_what_peft_cannot_express_is_refused_with_nothing_written(tmp_path, monkeypatch):
    """An architecture without a fused expert layout: the routed experts' adapters have no
    PEFT form, so the export refuses, naming the merged export, and writes nothing."""
    import dataclasses

    from megatron.sft.bridge.architectures import base as registry
    from megatron.sft.bridge.checkpoint_io import CheckpointError

    arch = "Qwen3MoeForCausalLM"
    hf = make_random_hf_model(arch, tmp_path / "hf", seed=5)
    convert_hf_to_megatron(hf, tmp_path / "base", ConvertOptions(
        layout=ParallelLayout(1, 1, ep=2), progress=False))
    run, _ = write_lora_run(tmp_path / "base", tmp_path / "run")
    monkeypatch.setitem(registry._REGISTRY, arch, dataclasses.replace(
        registry._REGISTRY[arch], fused_experts=None))
    with pytest.raises(CheckpointError, match="routed experts' adapters of Qwen3MoeForCausalLM "
                       "cannot be written as a PEFT adapter .*no fused expert layout.*merge_and_"
                       "export.sh"):
        export_lora_adapter(run, tmp_path / "peft", hf)
    assert not (tmp_path / "peft").exists()


def _hf_tensors(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_peft_gives_merged(hf, merged_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_model = AutoModelForCausalLM.from_pretrained(merged_dir)
        merged = merged_model(tokens).logits
        plain = AutoModelForCausalLM.from_pretrained(hf)(tokens).logits
        with _no_missing_keys_warning():
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf), adapter)
        got = model(tokens).logits
    # every adapter peft built was filled from the file (none left at its init)
    from safetensors.torch import load_file

    saved = load_file(adapter / "adapter_model.safetensors")
    built = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert sorted(built) == sorted(saved)
    assert all(torch.equal(built[n], saved[n]) for n in saved)
    assert (merged - plain).abs().max() > 1e-2  # the adapters change the model
    assert (merged - got).abs().max() <= 1e-4, (merged - got).abs().max()
    # and weight by weight: peft's own merge == the merged export (each fused expert tensor)
    want = merged_model.state_dict()
    for name, t in model.merge_and_unload().state_dict().items():
        torch.testing.assert_close(t, want[name], rtol=0, atol=1e-6, msg=name)


class _no_missing_keys_warning:
    """Fails the block when peft warns that adapter keys were missing or unexpected."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        bad = [str(w.message) for w in self.records if "keys" in str(w.message).lower()]
        assert not bad, bad
        return False
