"""LoRA launch recipes: the tiny CPU recipe trains adapters end to end (LORA_RANK=...), and the
14B recipe builds the torchrun command with the LoRA flags (PYTHON=echo prints it)."""

import json

import pytest

from sft_testing import run_tool
from megatron.sft.bridge.convert import ConvertOptions, convert_hf_to_megatron
from megatron.sft.runtime.layout import ParallelLayout

RECIPE = "scripts/sft/SFT_LoRA_R1_14B.sh"


@pytest.mark.xdist_group("multiprocess")
def test_tiny_cpu_recipe_trains_lora_adapters(sft_assets, tmp_path):
    ckpt = tmp_path / "megatron_TP2PP1"
    convert_hf_to_megatron(sft_assets["hf"], ckpt, ConvertOptions(layout=ParallelLayout(2, 1),
                                                                  progress=False))
    env = {"DEMO_DIR": str(tmp_path), "CKPT": str(ckpt), "DATA_PATH": sft_assets["data"],
           "LORA_RANK": "4", "TRAIN_ITERS": "6", "SEQ_LEN": "128", "GBS": "4", "MBS": "2"}
    r = run_tool("scripts/sft/SFT_tiny_cpu.sh", "train", env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "LoRA: " in r.stdout and "trainable of" in r.stdout
    run = tmp_path / "sft_tiny_lora_r4"
    lora = json.loads((run / "iter_0000006" / "lora.json").read_text())
    assert lora["settings"]["rank"] == 4 and lora["settings"]["alpha"] == 8.0
    assert lora["base_checkpoint"] == str(ckpt.resolve())


def test_lora_recipe_usage_and_missing_checkpoint(tmp_path):
    r = run_tool(RECIPE)
    assert r.returncode == 2 and "Usage: bash scripts/sft/SFT_LoRA_R1_14B.sh train" in r.stdout
    r = run_tool(RECIPE, "train", env={"ASSETS_DIR": str(tmp_path)})
    assert r.returncode == 2
    assert "convert_deepseek_r1_to_megatron.sh 14B 2 1" in r.stderr


def test_lora_recipe_builds_the_command(tmp_path):
    ckpt = tmp_path / "checkpoints" / "deepseek_ai_DeepSeek_R1_Distill_Qwen_14B_Megatron_TP2PP1"
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1\n")
    data = tmp_path / "data" / "Vinnnf-Hybrid-OpenThoughts2-1M-1.5B"
    data.mkdir(parents=True)
    prefix = data / ("Tokenized-Vinnnf-Hybrid-OpenThoughts2-1M-1.5B-"
                     "deepseek_ai_DeepSeek_R1_Distill_Qwen_14B-16384")
    (prefix.parent / (prefix.name + "_text_document.idx")).write_text("")
    env = {"ASSETS_DIR": str(tmp_path), "PYTHON": "echo", "LORA_RANK": "16", "TRAIN_ITERS": "10"}
    r = run_tool(RECIPE, "train", env=env)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()

    def value(flag):
        return cmd[cmd.index(flag) + 1]

    assert value("--load") == str(ckpt) and value("--tensor-model-parallel-size") == "2"
    assert value("--lora-rank") == "16" and value("--lora-alpha") == "64"
    assert value("--lora-target-modules") == "linear_qkv,linear_proj,linear_fc1,linear_fc2"
    assert value("--transformer-impl") == "local" and "--sequence-parallel" not in cmd
    save = tmp_path / "checkpoints" / "SFT_LoRA_R1_14B"
    (save / "latest_checkpointed_iteration.txt").write_text("5\n")
    cmd = run_tool(RECIPE, "train", env=env).stdout.split()
    assert cmd[cmd.index("--load") + 1] == str(save)
