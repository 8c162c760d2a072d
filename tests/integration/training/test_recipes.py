"""Launch recipes: usage, clear errors for missing inputs, and the torchrun command they build
(PYTHON=echo prints it instead of running it)."""

from sft_testing import run_tool

RECIPE = "scripts/sft/SFT_Hybrid_R1_1.5B_OpenThoughts_1M.sh"


def test_recipe_needs_the_train_mode():
    r = run_tool(RECIPE)
    assert r.returncode == 2 and "Usage: bash scripts/sft/SFT_Hybrid_R1_1.5B" in r.stdout


def test_recipe_explains_missing_checkpoint(tmp_path):
    r = run_tool(RECIPE, "train", env={"ASSETS_DIR": str(tmp_path)})
    assert r.returncode == 2
    assert "convert first: bash scripts/checkpoints/convert_deepseek_r1_to_megatron.sh 1.5B 1 1" in r.stderr


def test_recipe_builds_the_multinode_command(tmp_path):
    ckpt = tmp_path / "checkpoints" / "deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B_Megatron_TP2PP1"
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1\n")
    data = tmp_path / "data" / "Vinnnf-Hybrid-OpenThoughts2-1M-1.5B"
    data.mkdir(parents=True)
    prefix = data / "Tokenized-Vinnnf-Hybrid-OpenThoughts2-1M-1.5B-deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B-16384"
    (prefix.parent / (prefix.name + "_text_document.idx")).write_text("")
    env = {"ASSETS_DIR": str(tmp_path), "PYTHON": "echo", "TP": "2", "NNODES": "2",
           "NODE_RANK": "1", "MASTER_ADDR": "node0", "GBS": "128", "TRAIN_ITERS": "10"}
    r = run_tool(RECIPE, "train", env=env)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    def value(flag):
        return cmd[cmd.index(flag) + 1]
    assert value("--nnodes") == "2" and value("--node-rank") == "1"
    assert value("--master-addr") == "node0" and value("--nproc-per-node") == "8"
    assert value("--load") == str(ckpt) and value("--tensor-model-parallel-size") == "2"
    assert value("--global-batch-size") == "128" and value("--train-iters") == "10"
    assert value("--data-path") == str(prefix) and value("--seq-length") == "16384"
    assert "--sequence-parallel" in cmd and "--bf16" in cmd and "--use-distributed-optimizer" in cmd
    assert "--train-epochs" not in cmd
    # A second run resumes from the run's own checkpoints once they exist.
    save = tmp_path / "checkpoints" / "SFT_Hybrid_R1_1.5B"
    (save / "latest_checkpointed_iteration.txt").write_text("5\n")
    r = run_tool(RECIPE, "train", env=env)
    cmd = r.stdout.split()
    assert cmd[cmd.index("--load") + 1] == str(save)


def test_recipe_loads_hf_model_directly_without_converting(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    data = tmp_path / "data" / "Vinnnf-Hybrid-OpenThoughts2-1M-1.5B"
    data.mkdir(parents=True)
    prefix = data / "Tokenized-Vinnnf-Hybrid-OpenThoughts2-1M-1.5B-deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B-16384"
    (prefix.parent / (prefix.name + "_text_document.idx")).write_text("")
    env = {"ASSETS_DIR": str(tmp_path), "PYTHON": "echo", "HF_MODEL": str(hf),
           "SAVE_HF": str(tmp_path / "out_hf"), "TRAIN_ITERS": "10"}
    r = run_tool(RECIPE, "train", env=env)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    assert cmd[cmd.index("--load") + 1] == str(hf)
    assert cmd[cmd.index("--save-hf") + 1] == str(tmp_path / "out_hf")
    r = run_tool(RECIPE, "train", env={**env, "HF_MODEL": str(tmp_path / "nothing")})
    assert r.returncode == 2 and "HF_MODEL=" in r.stderr and "download_hf_models.py" in r.stderr
    # without HF_MODEL and without a conversion the error names both ways
    r = run_tool(RECIPE, "train", env={"ASSETS_DIR": str(tmp_path)})
    assert r.returncode == 2 and "set HF_MODEL=" in r.stderr and "convert first" in r.stderr


TINY = "scripts/sft/SFT_tiny_cpu.sh"


def _demo_dir(root, *datasets):
    """What `make demo` leaves, as far as the recipe looks: a converted checkpoint and
    Tokenized-* datasets."""
    (root / "megatron_TP2PP1").mkdir(parents=True)
    (root / "megatron_TP2PP1" / "latest_checkpointed_iteration.txt").write_text("1\n")
    (root / "data").mkdir()
    for name in datasets:
        (root / "data" / f"{name}_text_document.idx").write_text("")
    return [str(root / "data" / name) for name in datasets]


def test_tiny_recipe_with_two_datasets_lists_them_and_how_to_pick(tmp_path):
    """Was: the alphabetically first dataset was trained on, without a word."""
    a, b = _demo_dir(tmp_path, "Tokenized-chat-tok-256", "Tokenized-other-tok-512")
    r = run_tool(TINY, "train", env={"DEMO_DIR": str(tmp_path), "PYTHON": "echo"})
    assert r.returncode == 2 and not r.stdout
    assert r.stderr.splitlines() == [
        f"error: 2 tokenized datasets in {tmp_path}/data; choose one with DATA_PATH:",
        f"  {a}", f"  {b}", f"e.g. DATA_PATH={a} bash {r.stderr.split()[-2]} train"]
    assert r.stderr.split()[-2].endswith(TINY)
    # Picking one works; TRAIN_ITERS=5 no longer means 5 warm-up iterations out of 5.
    r = run_tool(TINY, "train", env={"DEMO_DIR": str(tmp_path), "PYTHON": "echo",
                                     "DATA_PATH": b, "TRAIN_ITERS": "5"})
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    assert cmd[cmd.index("--data-path") + 1] == b
    assert cmd[cmd.index("--lr-warmup-iters") + 1] == "0"
    r = run_tool(TINY, "train", env={"DEMO_DIR": str(tmp_path), "PYTHON": "echo", "DATA_PATH": b})
    cmd = r.stdout.split()
    assert cmd[cmd.index("--lr-warmup-iters") + 1] == "5"  # the default 60 iterations: as before
CP_RECIPE = "scripts/sft/SFT_R1_7B_32k_CP.sh"


def test_cp_recipe_trains_7b_on_32k_rows_at_cp2_tp2_and_rounds_the_row_length(tmp_path):
    ckpt = tmp_path / "checkpoints" / "deepseek_ai_DeepSeek_R1_Distill_Qwen_7B_Megatron_TP2PP1"
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1\n")
    data = tmp_path / "data" / "Vinnnf-Hybrid-OpenThoughts2-1M-1.5B"
    data.mkdir(parents=True)
    prefix = data / ("Tokenized-Vinnnf-Hybrid-OpenThoughts2-1M-1.5B-deepseek_ai_DeepSeek_R1_"
                     "Distill_Qwen_7B-32768")
    (prefix.parent / (prefix.name + "_text_document.idx")).write_text("")
    env = {"ASSETS_DIR": str(tmp_path), "PYTHON": "echo"}
    r = run_tool(CP_RECIPE, "train", env=env)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()

    def value(flag):
        return cmd[cmd.index(flag) + 1]
    assert value("--nproc-per-node") == "8" and value("--context-parallel-size") == "2"
    assert value("--tensor-model-parallel-size") == "2" and "--sequence-parallel" in cmd
    assert value("--seq-length") == "32768" and value("--data-path") == str(prefix)
    assert value("--chunked-loss") == "auto"
    # a row length that does not cut into 2 x CP x TP parts is rounded up, and said so
    r = run_tool(CP_RECIPE, "train", env={**env, "SEQ_LEN": "30000", "CP": "4"})
    cmd = r.stdout.split()
    assert r.returncode == 0 and value("--seq-length") == "30000"  # 1875 x (2 x 4 x 2)
    r = run_tool(CP_RECIPE, "train", env={**env, "SEQ_LEN": "30001"})
    cmd = r.stdout.split()
    assert cmd[cmd.index("--seq-length") + 1] == "30008"
    assert "SEQ_LEN 30001 -> 30008, a multiple of 8 (2 x CP=2 x TP=2)" in r.stderr
    # the 1.5B recipe takes CP too
    r = run_tool(RECIPE, "train", env={"ASSETS_DIR": str(tmp_path), "CP": "2"})
    assert r.returncode == 2 and "convert_deepseek_r1_to_megatron.sh 1.5B 1 1" in r.stderr


def test_recipe_with_fsdp_uses_megatron_fsdp_and_refuses_a_pipeline(tmp_path):
    ckpt = tmp_path / "checkpoints" / "deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B_Megatron_TP1PP1"
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1\n")
    env = {"ASSETS_DIR": str(tmp_path), "PYTHON": "echo", "FSDP": "1", "TRAIN_ITERS": "10"}
    data = tmp_path / "data" / "Vinnnf-Hybrid-OpenThoughts2-1M-1.5B"
    data.mkdir(parents=True)
    (data / "Tokenized-Vinnnf-Hybrid-OpenThoughts2-1M-1.5B-deepseek_ai_DeepSeek_R1_Distill_"
            "Qwen_1.5B-16384_text_document.idx").write_text("")
    r = run_tool(RECIPE, "train", env=env)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    assert "--use-megatron-fsdp" in cmd and "--use-distributed-optimizer" not in cmd
    assert cmd[cmd.index("--data-parallel-sharding-strategy") + 1] == "optim_grads_params"
    r = run_tool(RECIPE, "train", env={**env, "PP": "2"})
    assert r.returncode == 2 and "error: FSDP=1 with PP=2: megatron-core's Megatron-FSDP does " \
        "not support pipeline parallelism" in r.stderr


def test_every_gpu_recipe_takes_hf_model_directly(tmp_path):
    """The shared preamble gives each recipe the same HF_MODEL=DIR path and the same errors."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    prefix = tmp_path / "tok"
    (tmp_path / "tok_text_document.idx").write_text("")
    for recipe in ("scripts/sft/SFT_Qwen3_30B_A3B_MoE.sh", "scripts/sft/SFT_R1_7B_32k_CP.sh",
                   "scripts/sft/SFT_LoRA_R1_14B.sh", "scripts/sft/SFT_GPT_OSS_20B.sh"):
        env = {"ASSETS_DIR": str(tmp_path / "assets"), "PYTHON": "echo", "HF_MODEL": str(hf),
               "DATA_PATH": str(prefix), "TRAIN_ITERS": "3", "SAVE_DIR": str(tmp_path / "run")}
        r = run_tool(recipe, "train", env=env)
        assert r.returncode == 0, (recipe, r.stderr)
        cmd = r.stdout.split()
        assert cmd[cmd.index("--load") + 1] == str(hf), recipe
        assert cmd[cmd.index("--data-path") + 1] == str(prefix), recipe
        r = run_tool(recipe, "train", env={**env, "DATA_PATH": str(tmp_path / "missing")})
        assert r.returncode == 2 and "no tokenized data at" in r.stderr, (recipe, r.stderr)
        r = run_tool(recipe, "train", env={**env, "HF_MODEL": str(tmp_path / "nothing")})
        assert r.returncode == 2 and "has no config.json" in r.stderr, (recipe, r.stderr)


def test_gpt_oss_recipe_runs_ep8_with_sinks_capable_attention_and_whole_experts_at_tp2(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (tmp_path / "tok_text_document.idx").write_text("")
    env = {"ASSETS_DIR": str(tmp_path / "assets"), "PYTHON": "echo", "HF_MODEL": str(hf),
           "DATA_PATH": str(tmp_path / "tok"), "SAVE_DIR": str(tmp_path / "run")}
    r = run_tool("scripts/sft/SFT_GPT_OSS_20B.sh", "train", env=env)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()

    def value(flag):
        return cmd[cmd.index(flag) + 1]

    assert value("--expert-model-parallel-size") == "8" and value("--nproc-per-node") == "8"
    assert value("--tensor-model-parallel-size") == "1"
    assert "--expert-tensor-parallel-size" not in cmd
    assert value("--attention-backend") == "flex" and value("--moe-experts-impl") == "grouped_mm"
    # TP2: attention split, experts whole (megatron-core runs expert biases at ETP 1 only)
    r = run_tool("scripts/sft/SFT_GPT_OSS_20B.sh", "train", env={**env, "TP": "2"})
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    assert value("--tensor-model-parallel-size") == "2"
    assert value("--expert-tensor-parallel-size") == "1" and "--sequence-parallel" in cmd
    # without HF_MODEL, the conversion it names keeps the experts whole too
    r = run_tool("scripts/sft/SFT_GPT_OSS_20B.sh", "train", env={**env, "TP": "2", "HF_MODEL": ""})
    assert r.returncode != 0 and "ETP=1 bash scripts/checkpoints/convert_hf_to_megatron.sh" \
        in r.stderr and "TP2PP1EP8ETP1" in r.stderr
