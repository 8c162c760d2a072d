"""Mixture-of-Experts run settings: the flags (Megatron-LM names, YAML, recipe), what a MoE run
refuses, the routing padding mask, the console summary and active-parameter FLOPs (pure)."""

import dataclasses

import pytest
import torch

from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.training.arguments import TrainConfig, build_parser, parse_config
from megatron.sft.training.metrics import training_flops_per_token
from megatron.sft.model.moe.settings import check_moe_run, moe_config_overrides, routing_padding_mask
from megatron.sft.model.moe.metrics import console_summary
from sft_testing import REPO, run_tool

MOE_FLAGS = ["--expert-model-parallel-size", "--expert-tensor-parallel-size",
             "--moe-token-dispatcher-type", "--moe-aux-loss-coeff", "--moe-z-loss-coeff",
             "--moe-expert-capacity-factor", "--moe-experts-impl", "--moe-router-freeze",
             "--moe-experts-freeze"]


def _shape(arch="Qwen2MoeForCausalLM"):
    spec = get_architecture(arch)
    return spec.shape({"architectures": [arch], **spec.tiny_config})


def _cfg(**kw):
    return TrainConfig(**{"load": "/c", "data_path": "/d", "train_iters": 1, **kw})


def test_flags_yaml_and_layout():
    options = build_parser()._option_string_actions
    assert [f for f in MOE_FLAGS if f not in options] == []
    cfg = parse_config(["--config", str(REPO / "scripts/sft/configs/qwen3_30b_a3b_moe.yaml"),
                        "--load", "/c", "--data-path", "/d", "--moe-experts-impl", "sequential"])
    assert cfg.expert_model_parallel_size == 8 and cfg.moe_token_dispatcher_type == "alltoall"
    assert cfg.moe_experts_impl == "sequential" and cfg.parallel_layout().ep == 8
    assert cfg.moe_router_freeze is False and cfg.moe_experts_freeze is False
    assert parse_config(["--load", "/c", "--data-path", "/d", "--moe-router-freeze",
                         "--moe-experts-freeze"]).moe_experts_freeze is True
    with pytest.raises(ValueError, match="--moe-experts-impl 'loop': use one of auto"):
        _cfg(moe_experts_impl="loop").validate(1, 4)
    with pytest.raises(ValueError, match="--expert-tensor-parallel-size 1 with "
                                         "--tensor-model-parallel-size 2"):
        _cfg(tensor_model_parallel_size=2, expert_tensor_parallel_size=1,
             global_batch_size=8).validate(4, 4)
    with pytest.raises(ValueError, match="world size 6 is not divisible by "
                                         "--expert-tensor-parallel-size 1 x "
                                         "--expert-model-parallel-size 4"):
        _cfg(expert_model_parallel_size=4, global_batch_size=6).validate(6, 4)


def test_what_a_moe_run_refuses():
    moe, dense = _shape(), get_architecture("Qwen2ForCausalLM").shape(
        {"architectures": ["Qwen2ForCausalLM"], **get_architecture("Qwen2ForCausalLM").tiny_config})
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 2 with a "
                                         "Mixture-of-Experts model .* needs --sequence-parallel"):
        check_moe_run(_cfg(tensor_model_parallel_size=2), moe)
    check_moe_run(_cfg(tensor_model_parallel_size=2, sequence_parallel=True), moe)
    with pytest.raises(ValueError, match="--moe-aux-loss-coeff: Qwen2ForCausalLM has no experts"):
        check_moe_run(_cfg(moe_aux_loss_coeff=0.01), dense)
    with pytest.raises(ValueError, match="--moe-router-freeze, --moe-experts-freeze: "
                                         "Qwen2ForCausalLM has no experts; drop the flag"):
        check_moe_run(_cfg(moe_router_freeze=True, moe_experts_freeze=True), dense)
    # a frozen router's expert bias (where a family has one) is not moved either
    assert moe_config_overrides(_cfg(moe_router_freeze=True), moe) == {
        "moe_router_bias_update_rate": 0.0}
    check_moe_run(_cfg(tensor_model_parallel_size=2, sequence_parallel=True, lora_rank=4), moe)
    check_moe_run(_cfg(context_parallel_size=2), moe)  # MoE + CP: tests/integration/moe
    with pytest.raises(ValueError, match="--lora-rank with --expert-tensor-parallel-size 1"):
        check_moe_run(_cfg(tensor_model_parallel_size=2, sequence_parallel=True,
                           expert_tensor_parallel_size=1, lora_rank=4), moe)
    assert moe_config_overrides(_cfg(), moe) == {}  # the architecture's defaults stand
    assert moe_config_overrides(_cfg(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=1e-3,
                                     moe_token_dispatcher_type="allgather"), moe) == {
        "moe_aux_loss_coeff": 0.0, "moe_z_loss_coeff": 1e-3,
        "moe_token_dispatcher_type": "allgather"}
    assert get_architecture("Qwen2MoeForCausalLM").megatron_settings(
        {"architectures": ["Qwen2MoeForCausalLM"], **get_architecture(
            "Qwen2MoeForCausalLM").tiny_config}).transformer["moe_aux_loss_coeff"] == 0.001


def test_a_checkpoint_at_another_ep_is_refused_with_the_fix():
    from megatron.sft.runtime.layout import LayoutError, ParallelLayout

    with pytest.raises(LayoutError, match="checkpoint is split TP=1 PP=1 VPP=None but this run "
                                          "uses TP=1 PP=1 VPP=None EP=2 ETP=1; .*reshard"):
        ParallelLayout(1, 1, ep=2).check_same_files(ParallelLayout(1, 1))


def test_routing_padding_mask_marks_what_follows_the_last_sample():
    cu = torch.tensor([[0, 3, 5], [0, 6, -1]], dtype=torch.int32)  # collate_sft's padding
    assert routing_padding_mask(cu, 6).tolist() == [[False] * 5 + [True], [False] * 6]


def test_context_parallel_ranks_get_the_padding_mask_of_their_own_tokens():
    """The mask is made on whole rows and cut like the tokens: CP2 of a row of 8 whose sample
    ends at 5 -> rank 0 holds positions [0, 1, 6, 7], rank 1 [2, 3, 4, 5]; the padding the THD
    layout inserts (index -1) is padding too."""
    from megatron.sft.model.context_parallel.split import local_token_index
    from megatron.sft.model.moe.settings import routing_padding
    from megatron.sft.training.batch import local_micro_batch

    batch = {"tokens": torch.arange(8).view(1, 8), "labels": torch.arange(8).view(1, 8),
             "loss_mask": torch.ones(1, 8), "position_ids": torch.arange(8).view(1, 8),
             "cu_seqlens": torch.tensor([[0, 2, 5, -1]], dtype=torch.int32)}
    batch.update(routing_padding(batch, _shape()))
    masks = [local_micro_batch(batch, local_token_index(1, 8, 2, r))["padding_mask"].tolist()
             for r in (0, 1)]
    assert masks == [[[False, False, True, True]], [[False, False, False, True]]]
    te = local_micro_batch(batch, torch.tensor([[0, -1, 4, 5]]))["padding_mask"].tolist()
    assert te == [[False, True, False, True]]
    assert routing_padding(batch, get_architecture("Qwen2ForCausalLM").shape(
        {"architectures": ["Qwen2ForCausalLM"],
         **get_architecture("Qwen2ForCausalLM").tiny_config})) == {}


def test_console_summary():
    record = {"moe/aux_loss/layer_01": 1.01, "moe/aux_loss/layer_03": 1.2,
              "moe/imbalance/layer_01": 1.5, "moe/imbalance/layer_03": 2.25}
    assert console_summary(record) == "aux 1.010/1.200 | imbalance 1.500/2.250"
    many = {f"moe/imbalance/layer_{i:02d}": 1.0 + i / 10 for i in range(12)}
    assert console_summary(many) == "imbalance mean 1.550 max 2.100 (layer 11)"
    assert console_summary({"loss": 1.0}) is None


def test_active_parameter_flops_count_shared_expert_and_its_gate():
    """Qwen2-MoE's tiny shape by hand, per token (multiply-adds, forward): attention
    32*(32+2*16) + 32*32 = 3072 per layer; dense layers 0, 2: 3*32*64 = 6144; MoE layers 1, 3:
    top-2 experts 2*3*32*16 = 3072 + router 32*4 = 128 + shared expert 3*32*32 = 3072 + its
    gate 32 = 6304; LM head 301*32 = 9632. Attention over a 10-token document: 2 * 4 * 32 * 10
    per token; training is 3x forward."""
    shape = _shape()
    matmuls = 4 * 3072 + 2 * 6144 + 2 * 6304 + 9632
    assert training_flops_per_token(shape, 10) == 3 * (2 * matmuls + 2 * 4 * 32 * 10)
    no_shared = dataclasses.replace(shape, moe=dataclasses.replace(
        shape.moe, shared_expert_ffn_hidden_size=None, shared_expert_gate=False))
    assert training_flops_per_token(shape, 10) - training_flops_per_token(no_shared, 10) == \
        3 * 2 * 2 * (3072 + 32)


def test_moe_recipe_builds_the_command(tmp_path):
    recipe = "scripts/sft/SFT_Qwen3_30B_A3B_MoE.sh"
    r = run_tool(recipe)
    assert r.returncode == 2 and "Usage: bash scripts/sft/SFT_Qwen3_30B_A3B_MoE.sh" in r.stdout
    r = run_tool(recipe, "train", env={"ASSETS_DIR": str(tmp_path)})
    assert r.returncode == 2 and "EP=8 bash scripts/checkpoints/convert_hf_to_megatron.sh" in r.stderr
    ckpt = tmp_path / "checkpoints" / "Qwen_Qwen3_30B_A3B_Megatron_TP2PP1EP4"
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1\n")
    (tmp_path / "d_text_document.idx").write_text("")
    r = run_tool(recipe, "train", env={"ASSETS_DIR": str(tmp_path), "PYTHON": "echo", "TP": "2",
                                       "EP": "4", "DATA_PATH": str(tmp_path / "d"),
                                       "MOE_Z_LOSS_COEFF": "1e-3", "MOE_EXPERTS_IMPL": "grouped_mm",
                                       "MOE_ROUTER_FREEZE": "1"})
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    value = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    assert value("--load") == str(ckpt) and value("--expert-model-parallel-size") == "4"
    assert value("--moe-experts-impl") == "grouped_mm" and value("--moe-z-loss-coeff") == "1e-3"
    assert "--sequence-parallel" in cmd and "--moe-aux-loss-coeff" not in cmd
    assert "--moe-router-freeze" in cmd and "--moe-experts-freeze" not in cmd


def test_freeze_moe_stops_gradients_to_routers_or_experts_only():
    """On a module tree shaped like megatron-core's (layer.mlp.router / .experts /
    .shared_experts; a dense layer's mlp has no router)."""
    from megatron.sft.model.moe.freeze import freeze_moe

    def model():
        layers = torch.nn.ModuleList()
        for moe in (False, True):
            layer = torch.nn.Module()
            layer.self_attention = torch.nn.Linear(4, 4)
            layer.mlp = torch.nn.Module()
            if moe:
                layer.mlp.router = torch.nn.Linear(4, 3)  # weight + a bias, as GPT-OSS's
                layer.mlp.experts = torch.nn.Linear(4, 6)
                layer.mlp.shared_experts = torch.nn.Linear(4, 4)
            else:
                layer.mlp.linear_fc1 = torch.nn.Linear(4, 8)
            layers.append(layer)
        m = torch.nn.Module()
        m.decoder = torch.nn.Module()
        m.decoder.layers = layers
        return m

    def trainable(m):
        return sorted(n for n, p in m.named_parameters() if p.requires_grad)

    everything = trainable(model())
    m = model()
    assert freeze_moe([m], router=True, experts=False) == 4 * 3 + 3
    assert trainable(m) == [n for n in everything if ".router." not in n]
    m = model()
    assert freeze_moe([m], router=False, experts=True) == 4 * 6 + 6
    assert trainable(m) == [n for n in everything if ".experts." not in n]
    assert "decoder.layers.1.mlp.shared_experts.weight" in trainable(m)
