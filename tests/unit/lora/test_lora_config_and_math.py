"""LoRA without a process group: flag validation, the per-shard merge vs the PEFT split
(fused QKV, gate/up, row-parallel inputs at TP2), and the base-checkpoint identity check."""

import json

import pytest
import torch

from megatron.sft.bridge.architectures import shape_of
from megatron.sft.bridge.architectures.llama import LLAMA
from megatron.sft.bridge.checkpoint_io import CheckpointError, CheckpointMetadata
from megatron.sft.bridge.rules import FusedGateUp, FusedQKV, ShardContext, TensorParallel
from megatron.sft.lora.merge import merge_adapters
from megatron.sft.lora.run_format import LoRACheckpointInfo, base_fingerprint, check_base
from megatron.sft.lora.settings import LoRASettings
from megatron.sft.lora.split import adapter_to_hf, target_names
from megatron.sft.runtime.layout import ParallelLayout
from megatron.sft.training.arguments import TrainConfig, parse_config


def test_lora_flags_parse_and_default_off():
    cfg = parse_config(["--load", "/c", "--data-path", "/d", "--train-iters", "1",
                        "--lora-rank", "8", "--lora-alpha", "32", "--lora-dropout", "0.1",
                        "--lora-target-modules", "linear_fc2,linear_qkv"])
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == (8, 32.0, 0.1)
    cfg.validate(1, 4)
    s = LoRASettings.from_flags(8, 32, 0.1, cfg.lora_target_modules)
    assert s.targets == ("linear_qkv", "linear_fc2") and s.scale == 4.0
    assert LoRASettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert TrainConfig().lora_rank == 0


def test_routed_expert_adapters_are_part_of_a_runs_shape():
    """A MoE run's routed experts carry adapters on the MLP targets it has; a run saved before
    that (no key in lora.json) has none, and resuming it asks for the same."""
    from megatron.sft.bridge.architectures import get_architecture
    from megatron.sft.training.lora_model import settings_from_config

    moe = LoRASettings.from_flags(4, 8, 0.0, "linear_qkv,linear_fc2", routed_experts=True)
    assert moe.expert_targets == ("linear_fc2",)
    assert LoRASettings.from_dict(json.loads(json.dumps(moe.to_dict()))) == moe
    old = LoRASettings.from_dict({"rank": 4, "alpha": 8, "targets": ["linear_qkv", "linear_fc2"]})
    assert old.expert_targets == () and not old.same_shape(moe)
    attention_only = LoRASettings.from_flags(4, 8, 0.0, "linear_qkv", routed_experts=True)
    assert attention_only.same_shape(LoRASettings.from_flags(4, 8, 0.0, "linear_qkv"))
    arch = "Qwen3MoeForCausalLM"
    shape = get_architecture(arch).shape({"architectures": [arch],
                                          **get_architecture(arch).tiny_config})
    cfg = TrainConfig(load="/c", data_path="/d", lora_rank=4)
    assert settings_from_config(cfg, shape).expert_targets == ("linear_fc1", "linear_fc2")
    assert settings_from_config(TrainConfig(load="/c", data_path="/d", lora_rank=4,
                                            moe_experts_freeze=True), shape).expert_targets == ()


@pytest.mark.parametrize("overrides, message", [
    (dict(lora_rank=-1), "--lora-rank -1: use a positive rank"),
    (dict(lora_rank=4, lora_target_modules="linear_qkv,q_proj"),
     r"--lora-target-modules linear_qkv,q_proj: unknown \['q_proj'\]"),
    (dict(lora_rank=4, lora_target_modules=" , "), "--lora-target-modules .*none given"),
    (dict(lora_rank=4, lora_alpha=0.0), "--lora-alpha 0.0: must be positive"),
    (dict(lora_rank=4, lora_dropout=1.0), r"--lora-dropout 1.0: must be in \[0, 1\)"),
])
def test_bad_lora_flags_are_clear_errors(overrides, message):
    cfg = TrainConfig(load="/c", data_path="/d", train_iters=1, **overrides)
    with pytest.raises(ValueError, match=message):
        cfg.validate(1, 4)


def test_lora_takes_sequence_parallelism():
    TrainConfig(load="/c", data_path="/d", train_iters=1, lora_rank=4, sequence_parallel=True,
                tensor_model_parallel_size=2, seq_length=128).validate(2, 4)


def _shape():
    return shape_of({"architectures": ["LlamaForCausalLM"], **LLAMA.tiny_config})[1]


@pytest.mark.parametrize("target", ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
def test_merge_per_shard_equals_peft_split(target):
    """(alpha/r) B A merged into each TP2 shard and exported through the weight rules equals
    the HF per-module B_hf A_hf from the PEFT split, so both exports describe one model."""
    shape, tp, r, scale = _shape(), 2, 3, 2.5
    hidden, ffn = shape.hidden_size, shape.ffn_hidden_size
    qkv_rows = (shape.num_attention_heads + 2 * shape.num_query_groups) * shape.head_dim
    base_shape, column = {"linear_qkv": ((qkv_rows, hidden), True),
                          "linear_proj": ((hidden, shape.num_attention_heads * shape.head_dim),
                                          False),
                          "linear_fc1": ((2 * ffn, hidden), True),
                          "linear_fc2": ((hidden, ffn), False)}[target]
    out, inp = base_shape
    g = torch.Generator().manual_seed(0)
    if column:
        a = torch.randn(r, inp, generator=g, dtype=torch.float64)
        a_shards = [a, a.clone()]
        b_shards = [torch.randn(out // tp, r, generator=g, dtype=torch.float64) for _ in range(tp)]
        w_shards = [torch.zeros(out // tp, inp, dtype=torch.float64) for _ in range(tp)]
    else:
        a_shards = [torch.randn(r, inp // tp, generator=g, dtype=torch.float64)
                    for _ in range(tp)]
        b = torch.randn(out, r, generator=g, dtype=torch.float64)
        b_shards = [b, b.clone()]
        w_shards = [torch.zeros(out, inp // tp, dtype=torch.float64) for _ in range(tp)]
    name = f"x.{target}"
    merged = [merge_adapters({name + ".weight": w}, {name + ".lora.A": a, name + ".lora.B": b},
                             scale)[name + ".weight"]
              for w, a, b in zip(w_shards, a_shards, b_shards)]
    rule = {"linear_qkv": FusedQKV("m", ("q", "k", "v")),
            "linear_fc1": FusedGateUp("m", ("gate", "up")),
            "linear_proj": TensorParallel("m", ("o",), dim=1),
            "linear_fc2": TensorParallel("m", ("down",), dim=1)}[target]
    expected = rule.to_hf(merged, ShardContext(shape, tp, 0))
    peft = adapter_to_hf(target_names(LLAMA, target), a_shards, b_shards, shape)
    assert len(peft) == len(expected)
    for (module, (ha, hb)), want in zip(peft.items(), expected):
        torch.testing.assert_close(scale * hb @ ha, want, rtol=0, atol=1e-12, msg=module)


def _meta(**changes):
    d = dict(architecture="LlamaForCausalLM", hf_config={"hidden_size": 64},
             layout=ParallelLayout(), make_vocab_size_divisible_by=128,
             padded_vocab_size=256, params_dtype="float32")
    d.update(changes)
    return CheckpointMetadata(**d)


def test_adapters_refuse_a_changed_or_missing_base(tmp_path):
    from megatron.sft.bridge.checkpoint_io import write_metadata

    base = tmp_path / "base"
    it = base / "iter_0000001"
    (it / "mp_rank_00").mkdir(parents=True)
    write_metadata(it, _meta())
    (it / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"x" * 10)
    (base / "latest_checkpointed_iteration.txt").write_text("1\n")
    info = LoRACheckpointInfo(LoRASettings(4, 8.0), str(base), 1, base_fingerprint(it))
    assert check_base(info, _meta(), tmp_path / "run") == it
    with pytest.raises(CheckpointError, match="differs in hf_config"):
        check_base(info, _meta(hf_config={"hidden_size": 128}), tmp_path / "run")
    (it / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"x" * 11)  # weights replaced
    with pytest.raises(CheckpointError, match="has changed"):
        check_base(info, _meta(), tmp_path / "run")
    moved = LoRACheckpointInfo(info.settings, str(tmp_path / "gone"), 1, info.base_fingerprint)
    with pytest.raises(CheckpointError, match="not readable.*edit base_checkpoint"):
        check_base(moved, _meta(), tmp_path / "run")
