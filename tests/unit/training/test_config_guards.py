"""Settings that used to be silently wrong or die in a traceback (issue 17, section 3): YAML
values typed like the flags, and zero/negative sizes, rates and intervals refused up front."""

import dataclasses
import re

import pytest
import yaml

from megatron.sft.training.arguments import TrainConfig, parse_config

BASE = dict(load="/c", data_path="/d", train_iters=5)


def _yaml(tmp_path, text):
    path = tmp_path / "sft.yaml"
    path.write_text(text)
    return path


# --- YAML typed like the CLI -------------------------------------------------------------------
def test_yaml_values_are_typed_like_the_flags(tmp_path):
    """Was: ``lr: 1e-5`` stayed the string '1e-5' (PyYAML needs a dot), ``bf16: "false"`` was a
    true string, ``train_iters: "3"`` a string that broke later."""
    path = _yaml(tmp_path, 'load: /c\nlr: 1e-5\nbf16: "false"\ntrain-iters: "3"\npacking: "no"\n'
                           'sequence_parallel: "Yes"\nverify: 0\nrecompute_granularity: null\n'
                           'min-lr: "0"\nsplit: 100\n')
    cfg = parse_config(["--config", str(path)])
    assert cfg.lr == 1e-5 and type(cfg.lr) is float
    assert cfg.bf16 is False and cfg.packing is False and cfg.sequence_parallel is True
    assert cfg.verify is False and cfg.recompute_granularity is None
    assert cfg.train_iters == 3 and type(cfg.train_iters) is int
    assert cfg.min_lr == 0.0 and type(cfg.min_lr) is float and cfg.split == "100"


def _quoted(value):
    """A default as quoted YAML text: ``True`` -> ``"true"``, ``1e-05`` -> ``"1e-05"``."""
    if value is None:
        return "null"
    return f'"{str(value).lower()}"' if isinstance(value, bool) else f'"{value}"'


def test_every_field_reads_its_default_back_from_yaml_text(tmp_path):
    """The coercion comes from the field types the CLI is generated from: every field, written
    as quoted text (or null), reads back as its default, with its type."""
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name != "load"]
    text = "load: /c\n" + "".join(f"{f.name}: {_quoted(f.default)}\n" for f in fields)
    cfg = parse_config(["--config", str(_yaml(tmp_path, text))])
    for f in fields:
        got = getattr(cfg, f.name)
        assert got == f.default and type(got) is type(f.default), f.name


@pytest.mark.parametrize("text, message", [
    ("train_iters: abc", "key 'train_iters' is 'abc' (a string), but --train-iters takes an "
                         "integer or null; write e.g. 'train_iters: 10'"),
    ("micro-batch-size: [2, 4]", "key 'micro-batch-size' is [2, 4] (a list), but "
                                 "--micro-batch-size takes an integer"),
    ("train_iters: 3.5", "key 'train_iters' is 3.5 (a number), but --train-iters takes an integer"),
    ("lr: fast", "key 'lr' is 'fast' (a string), but --lr takes a number; write e.g. 'lr: 1.0e-05'"),
    ("bf16: maybe", "key 'bf16' is 'maybe' (a string), but --bf16 takes true or false"),
    ("seq_length: null", "key 'seq_length' is null, but --seq-length takes an integer"),
    ("lr_decay_style: cosin", "key 'lr_decay_style' is 'cosin' (a string), but --lr-decay-style "
                              "takes one of constant, linear, cosine, inverse-square-root"),
    ("no-packing: true", "unknown key 'no-packing'; write 'packing: false' for --no-packing"),
    ("learning_rate: 1", "unknown key 'learning_rate'"),
    ("- lr: 1e-5\n- bf16: true", "holds a list, but a --config file must be a mapping of flag "
                                 "names to values"),
    ("lr: 1e-5\n  bf16: : true", "is not valid YAML: mapping values are not allowed here at "
                                 "line 2, column 7"),
    ("train-iters: 3\ntrain_iters: 4", "train_iters is given twice"),
])
def test_bad_yaml_names_the_file_the_key_and_the_type(tmp_path, text, message):
    path = _yaml(tmp_path, text + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}") + ".*" + re.escape(message)):
        parse_config(["--config", str(path), "--load", "/c"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match=r"--config .*nope.yaml: no such file"):
        parse_config(["--config", str(tmp_path / "nope.yaml"), "--load", "/c"])


def test_the_examples_in_messages_are_valid_yaml_of_the_right_type(tmp_path):
    """'write e.g. ...' must itself parse to the flag's type (PyYAML's float needs a dot)."""
    path = _yaml(tmp_path, "lr: [1]\n")
    with pytest.raises(ValueError) as err:
        parse_config(["--config", str(path), "--load", "/c"])
    example = str(err.value).split("write e.g. '")[1].rstrip("'")
    assert isinstance(yaml.safe_load(example)["lr"], float)


# --- refused with a clear message --------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(lr=0.0), "--lr 0.0: with a zero learning rate the weights never change and the run "
                   "trains nothing; give a positive --lr such as 1e-5, or --allow-zero-lr"),
    (dict(lr=-1e-5, min_lr=-1.0), "--lr -1e-05 is negative: the optimizer would climb the loss; "
                                  "give a positive --lr such as 1e-5"),
    (dict(lr=-1e-5, allow_zero_lr=True), "--lr -1e-05 is negative"),
    (dict(min_lr=-0.1), "--min-lr -0.1 is negative"),
    (dict(micro_batch_size=0), "--micro-batch-size 0: a forward/backward pass needs at least one "
                               "row; use --micro-batch-size 1 or more"),
    (dict(global_batch_size=0), "--global-batch-size 0: an optimizer step needs at least one "
                                "row; use a positive multiple of --micro-batch-size 1"),
    (dict(global_batch_size=-8), "--global-batch-size -8:"),
    (dict(train_iters=-3), "--train-iters -3 trains nothing: give the number of optimizer steps, "
                           "1 or more"),
    (dict(train_iters=0), "--train-iters 0 trains nothing"),
    (dict(train_iters=None, train_epochs=0.0), "--train-epochs 0.0 trains nothing"),
    (dict(log_interval=0), "--log-interval 0: give a positive number of iterations between log "
                           "lines"),
    (dict(eval_iters=0, eval_interval=20), "--eval-iters 0 with --eval-interval 20: each "
                                           "evaluation would average over no batch; give "
                                           "--eval-iters 1 or more, or drop --eval-interval"),
    (dict(eval_interval=0), "--eval-interval 0: give a positive number of iterations"),
    (dict(save="/s", save_interval=0), "--save-interval 0: give a positive number of iterations, "
                                       "or drop --save-interval (the run still saves at the end)"),
    (dict(save="/s", save_interval=-5), "--save-interval -5:"),
    (dict(exit_interval=0), "--exit-interval 0:"),
    (dict(seq_length=1), "--seq-length 1: a row needs at least 2 tokens"),
    (dict(lr_warmup_iters=5), "--lr-warmup-iters 5 is not below --train-iters 5: the learning "
                              "rate would never finish warming up; use --lr-warmup-iters 0 (or "
                              "any value below 5), --lr-warmup-fraction 0.1, or train longer"),
    (dict(lr_warmup_iters=-1), "--lr-warmup-iters -1 is negative"),
    (dict(lr_warmup_fraction=1.0), "--lr-warmup-fraction 1.0 is outside [0, 1)"),
    (dict(lr_warmup_fraction=-0.1), "--lr-warmup-fraction -0.1 is outside [0, 1)"),
    (dict(weight_decay=-0.1), "--weight-decay -0.1 is negative"),
    (dict(save="/s", save_hf_interval=10), "--save-hf-interval 10 needs --save-hf DIR (where the "
                                          "HF model goes); add it, or drop --save-hf-interval"),
    (dict(save="/s", save_hf="/h", save_hf_interval=0), "--save-hf-interval 0: give a positive "
                                                         "number of iterations"),
    (dict(save_hf="/h"), "--save-hf /h needs --save DIR: the HF files are exported from the "
                         "saved Megatron checkpoint (as merge_and_export.sh does); add --save"),
    (dict(save_hf_adapter="/a", lora_rank=4), "--save-hf-adapter /a needs --save DIR"),
    (dict(save="/s", save_hf_adapter="/a"), "--save-hf-adapter /a needs --lora-rank R: only a "
                                            "LoRA run has an adapter; use --save-hf"),
])
def test_refused_with_the_flag_the_value_and_the_fix(overrides, message):
    cfg = TrainConfig(**{**BASE, **overrides})
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg.validate(1, 4)


def test_zero_lr_with_allow_zero_lr_and_valid_edges_pass():
    TrainConfig(**BASE, lr=0.0, min_lr=0.0, allow_zero_lr=True).validate(1, 4)
    TrainConfig(**BASE, lr_warmup_iters=4, eval_iters=0).validate(1, 4)  # no --eval-interval
    TrainConfig(**BASE, lr_warmup_fraction=0.0).validate(1, 4)


def test_warmup_is_checked_once_train_epochs_give_the_iterations():
    """validate() cannot know the iterations --train-epochs gives; the trainer calls
    check_schedule with them once the data is built (megatron-core's scheduler otherwise stops
    with a bare ``AssertionError: lr_warmup_steps < lr_decay_steps``)."""
    cfg = TrainConfig(load="/c", data_path="/d", train_epochs=1.0, lr_warmup_iters=5)
    cfg.validate(1, 4)
    cfg.check_schedule(6)
    with pytest.raises(ValueError, match=re.escape(
            "--lr-warmup-iters 5 is not below the 3 iteration(s) that --train-epochs 1.0 gives")):
        cfg.check_schedule(3)
