"""Training configuration: Megatron-LM flag names, YAML with command-line override, clear
errors for invalid combinations."""

import pytest

from megatron.sft.training.arguments import TrainConfig, build_parser, parse_config

MEGATRON_FLAGS = [
    "--tensor-model-parallel-size", "--pipeline-model-parallel-size",
    "--num-layers-per-virtual-pipeline-stage", "--sequence-parallel", "--micro-batch-size",
    "--global-batch-size", "--seq-length", "--lr", "--min-lr", "--lr-decay-style",
    "--lr-warmup-iters", "--lr-warmup-fraction", "--train-iters", "--weight-decay",
    "--adam-beta1", "--adam-beta2", "--clip-grad", "--bf16", "--use-distributed-optimizer",
    "--recompute-granularity", "--load", "--finetune", "--save", "--save-interval",
    "--eval-interval", "--eval-iters", "--data-path", "--split", "--seed", "--log-interval",
    "--tensorboard-dir", "--wandb-project", "--exit-interval", "--use-megatron-fsdp",
    "--data-parallel-sharding-strategy", "--no-load-optim",
]


def test_flag_names_match_megatron_lm():
    options = build_parser()._option_string_actions
    missing = [f for f in MEGATRON_FLAGS if f not in options]
    assert not missing


def test_yaml_then_command_line(tmp_path):
    cfg_file = tmp_path / "sft.yaml"
    cfg_file.write_text("load: /ckpt\nlr: 2.0e-5\nmicro-batch-size: 2\ntrain_iters: 10\n"
                        "data-path: /data\n")
    cfg = parse_config(["--config", str(cfg_file), "--lr", "3e-5"])
    assert cfg.lr == 3e-5 and cfg.micro_batch_size == 2 and cfg.train_iters == 10
    assert cfg.load == "/ckpt" and cfg.data_path == "/data"
    cfg_file.write_text("load: /ckpt\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown key 'learning_rate'"):
        parse_config(["--config", str(cfg_file)])


@pytest.mark.parametrize("overrides, world, layers, message", [
    (dict(global_batch_size=6, micro_batch_size=4), 2, 4,
     "--global-batch-size 6 is not divisible by --micro-batch-size 4 x data-parallel size 1"),
    (dict(global_batch_size=8, micro_batch_size=1), 3, 4,
     "world size 3 is not divisible by --tensor-model-parallel-size 2"),
    (dict(train_iters=None), 2, 4, "exactly one of --train-iters and --train-epochs"),
    (dict(lr_warmup_iters=1, lr_warmup_fraction=0.1), 2, 4,
     "can't give both --lr-warmup-iters and --lr-warmup-fraction"),
    (dict(pipeline_model_parallel_size=2, tensor_model_parallel_size=1), 2, 3,
     "num_layers 3 is not divisible by --pipeline-model-parallel-size 2"),
    (dict(num_layers_per_virtual_pipeline_stage=1), 2, 4,
     "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size >= 2"),
    (dict(save_interval=5), 2, 4, "--save-interval needs --save"),
    (dict(min_lr=1.0), 2, 4, "--min-lr 1.0 is larger than --lr"),
    (dict(use_megatron_fsdp=True, pipeline_model_parallel_size=2,
          tensor_model_parallel_size=1), 2, 4,
     "--use-megatron-fsdp --data-parallel-sharding-strategy optim_grads_params with "
     "--pipeline-model-parallel-size 2: megatron-core's Megatron-FSDP does not support"),
    (dict(data_parallel_sharding_strategy="optim"), 2, 4,
     "--data-parallel-sharding-strategy optim needs --use-megatron-fsdp"),
    (dict(use_megatron_fsdp=True, lora_rank=8), 2, 4,
     "--lora-rank 8 with --use-megatron-fsdp: megatron-core 0.16's Megatron-FSDP puts a "
     "gradient hook on every weight"),
])
def test_invalid_combinations(overrides, world, layers, message):
    base = dict(load="/c", data_path="/d", train_iters=5, tensor_model_parallel_size=2)
    cfg = TrainConfig(**{**base, **overrides})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg.validate(world, layers)


def test_warmup_fraction():
    cfg = TrainConfig(load="/c", lr_warmup_fraction=0.1)
    assert cfg.warmup_iters(100) == 10 and TrainConfig(load="/c").warmup_iters(100) == 0


def test_every_flag_is_explained_and_typed_from_its_field():
    import dataclasses

    parser = build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    assert set(actions) == {f.name for f in dataclasses.fields(TrainConfig)}
    for name, action in actions.items():
        assert action.help and len(action.help) > 10, name
    assert actions["attention_backend"].choices == ("auto", "te", "varlen", "flex", "sdpa",
                                                    "dense")
    assert actions["recompute_granularity"].choices == ("full", "selective")
    cfg = parse_config(["--load", "/c", "--no-packing", "--bf16", "--train-iters", "7",
                        "--lr-warmup-fraction", "0.5", "--attention-backend", "dense"])
    assert (cfg.packing, cfg.bf16, cfg.train_iters, cfg.lr_warmup_fraction,
            cfg.attention_backend) == (False, True, 7, 0.5, "dense")
    with pytest.raises(SystemExit):
        parse_config(["--load", "/c", "--attention-backend", "flash"])


def test_yaml_choices_are_validated(tmp_path):
    cfg = TrainConfig(load="/c", data_path="/d", train_iters=1, lr_decay_style="cosin")
    with pytest.raises(ValueError, match="--lr-decay-style 'cosin': use one of constant, linear"):
        cfg.validate(1, 4)


def test_fsdp_flags_read_from_the_command_line_and_yaml(tmp_path):
    cfg = parse_config(["--load", "/c", "--use-megatron-fsdp"])
    assert cfg.fsdp_strategy == "optim_grads_params"  # ZeRO-3 unless a strategy is given
    assert cfg.parallel_layout().fsdp == "optim_grads_params"
    (tmp_path / "f.yaml").write_text("load: /c\nuse-megatron-fsdp: true\n"
                                     "data_parallel_sharding_strategy: optim_grads\n")
    assert parse_config(["--config", str(tmp_path / "f.yaml")]).fsdp_strategy == "optim_grads"
    assert TrainConfig(load="/c").fsdp_strategy is None
