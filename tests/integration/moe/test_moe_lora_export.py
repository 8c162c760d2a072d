"""A LoRA run of a Mixture-of-Experts model exports as a PEFT adapter that peft itself loads onto
the transformers model and that computes the merged export (logits within 1e-4): dense layers'
MLPs, the shared expert and attention, at EP2. peft 0.21 rewrites Qwen3-MoE's
``gate_proj``/``up_proj``/``down_proj`` target modules into the fused expert parameters, so an
adapter naming them as modules leaves the dense MLPs at the base weights (the bug this guards:
the Qwen3-MoE case fails that way without it).

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
from megatron.sft.lora.run_format import LoRACheckpointInfo, base_fingerprint, write_lora_info
from megatron.sft.lora.settings import LoRASettings
from megatron.sft.runtime.layout import ParallelLayout

SETTINGS = LoRASettings(4, 8.0)
#: the Megatron modules each target adapts, written out here (not taken from the code under test)
TARGETS = {"linear_qkv": "self_attention", "linear_proj": "self_attention",
           "linear_fc1": "mlp", "linear_fc2": "mlp"}


def write_lora_run(base, run, iteration=3, seed=3):
    """A LoRA run on ``base`` (any EP) with A, B ~ N(0, 0.1) on every target the base has a
    weight for (on a MoE layer the MLP targets are its shared expert's), the dense adapters
    the same in every expert-parallel rank's file, as training saves them."""
    base_iter = iteration_dir(base)
    meta = read_metadata(base_iter)
    layout = meta.layout
    weights = load_rank_state(base_iter, layout, 0, 0)["model"]
    g = torch.Generator().manual_seed(seed)
    adapters = {}
    for layer in range(meta.hf_config["num_hidden_layers"]):
        for target, parent in TARGETS.items():
            for where in (f"{parent}.{target}", f"{parent}.shared_experts.{target}"):
                prefix = f"decoder.layers.{layer}.{where}"
                if prefix + ".weight" not in weights:
                    continue
                out, inp = weights[prefix + ".weight"].shape
                adapters[prefix + ".lora.A"] = torch.randn(SETTINGS.rank, inp, generator=g) * 0.1
                adapters[prefix + ".lora.B"] = torch.randn(out, SETTINGS.rank, generator=g) * 0.1
    partial = partial_iteration_dir(run, iteration)
    for ep in range(layout.ep):
        save_rank_state(partial, layout, 0, 0, {"checkpoint_version": CHECKPOINT_VERSION,
                                                "iteration": iteration, "model": adapters,
                                                "optimizer": {"state": {}}}, ep)
    write_metadata(partial, meta)
    write_lora_info(partial, LoRACheckpointInfo(SETTINGS, str(base.resolve()), 1,
                                                base_fingerprint(base_iter)))
    publish_iteration(run, iteration)
    return run, adapters


@pytest.mark.parametrize("arch", ["Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"])
def test_peft_loads_the_moe_adapter_and_matches_the_merged_export(arch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = make_random_hf_model(arch, tmp_path / "hf", seed=5)
    base = tmp_path / "base"
    convert_hf_to_megatron(hf, base, ConvertOptions(layout=ParallelLayout(1, 1, ep=2),
                                                    progress=False))
    run, adapters = write_lora_run(base, tmp_path / "run")
    # the dense layers' MLP and the shared expert are adapted (the tiny configs have both)
    assert any(".mlp.linear_fc1.lora.A" in n for n in adapters)
    assert any(".shared_experts." in n for n in adapters) == (arch == "Qwen2MoeForCausalLM")
    export_megatron_to_hf(open_checkpoint(run), tmp_path / "merged", hf,
                          ExportOptions(progress=False))
    adapter = export_lora_adapter(run, tmp_path / "peft", hf)

    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(tokens).logits
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
