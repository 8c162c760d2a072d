"""The recipes' per-GPU memory estimate counts the model's own parameters (transformers' count
of the same config) and places them as the layout does; the DeepSeek recipes print it before
they launch."""

import copy

import pytest
import torch

from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.bridge.random_hf_model import _config_class
from megatron.sft.training.memory_plan import plan_memory
from sft_testing import run_tool


def test_parameter_count_and_placement_match_transformers_and_the_layout():
    import transformers

    arch = "DeepseekV3ForCausalLM"
    kwargs = copy.deepcopy(dict(get_architecture(arch).tiny_config))
    cfg = _config_class(arch)(architectures=[arch], **kwargs)
    model = getattr(transformers, arch)(cfg)
    hf_count = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    one = plan_memory(cfg.to_dict(), world=1)
    assert one.total_params == hf_count
    assert one.rank_dense_params + one.rank_expert_params == hf_count
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert one.rank_expert_params == experts
    # EP2 halves the experts per GPU; the optimizer state of dense weights shards over DP4
    four = plan_memory(cfg.to_dict(), world=4, ep=2)
    assert four.rank_expert_params == experts // 2
    assert four.optimizer == 12 * four.rank_dense_params // 4 + 12 * (experts // 2) // 2
    assert four.weights == 2 * (four.rank_dense_params + experts // 2)
    with pytest.raises(ValueError, match="PP 3 does not divide the 4 layers"):
        plan_memory(cfg.to_dict(), world=3, pp=3)


def test_deepseek_recipe_prints_the_plan_then_launches(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (tmp_path / "d_text_document.idx").write_text("")
    env = {"ASSETS_DIR": str(tmp_path), "PYTHON": "echo", "HF_MODEL": str(hf),
           "DATA_PATH": str(tmp_path / "d"), "NODE_RANK": "3", "MASTER_ADDR": "node0"}
    r = run_tool("scripts/sft/SFT_DeepSeek_V3_671B.sh", "train", env=env)
    assert r.returncode == 0, r.stderr
    plan, launch = r.stdout.strip().splitlines()
    assert "tools/plan_memory.py" in plan and "--gpus 256" in plan and "--ep 32" in plan
    cmd = launch.split()
    assert cmd[cmd.index("--load") + 1] == str(hf) and "--sequence-parallel" in cmd
    assert cmd[cmd.index("--expert-model-parallel-size") + 1] == "32"
    assert cmd[cmd.index("--transformer-impl") + 1] == "local"
    assert cmd[cmd.index("--nnodes") + 1] == "32" and cmd[cmd.index("--node-rank") + 1] == "3"
    r = run_tool("scripts/sft/SFT_Moonlight_16B_A3B.sh", "train",
                 env={"ASSETS_DIR": str(tmp_path), "PYTHON": "echo"})
    assert r.returncode == 2 and "HF_MODEL" in r.stderr
