"""The resume decisions as pure functions: which flag disagrees with the checkpoint, which
saves a run will make, and the run history kept in run_metadata.json."""

import json
import re

import pytest

from megatron.sft.training.arguments import TrainConfig
from megatron.sft.training.resume import (
    ResumeError,
    append_run,
    check_optimizer_layout,
    optimizer_layout,
    plan_resume,
)
from megatron.sft.training.run_guard import _would_save_at

SAVED = {"max_lr": 1e-3, "min_lr": 0.0, "lr_decay_style": "cosine", "lr_warmup_steps": 8,
         "lr_decay_steps": 80, "start_wd": 0.0, "num_steps": 40}
IDENTITY = {"data_path": "/d", "stats": "abc", "seq_length": 128, "split": "98,2,0",
            "packing": True, "seed": 1234}


def _plan(cfg, identity=IDENTITY, wanted=None, **saved_state):
    wanted = wanted or {"max_lr": cfg.lr, "min_lr": cfg.min_lr,
                        "lr_decay_style": cfg.lr_decay_style, "warmup_iters": 2,
                        "start_wd": cfg.weight_decay, "train_iters": cfg.train_iters}
    train_state = {"data_position": 40, "data": {**IDENTITY, "global_batch_size": 4},
                   **saved_state}
    return plan_resume(cfg, iteration=10, saved_schedule=SAVED, saved_train_state=train_state,
                       wanted_schedule=wanted, identity=identity, ckpt="/ckpt")


def _cfg(**kw):
    return TrainConfig(**{"load": "/ckpt", "data_path": "/d", "train_iters": 20, "lr": 1e-3,
                          "lr_warmup_iters": 2, "global_batch_size": 4, "seq_length": 128,
                          **kw})


def test_the_same_flags_keep_the_schedule_and_the_position():
    plan = _plan(_cfg())
    assert plan.data_position == 40 and not plan.override_schedule
    assert plan.notes == ["resuming with the checkpoint's LR schedule: lr 0.001 (cosine decay to "
                          "0 over 20 iterations, 2 of warm-up)"]


@pytest.mark.parametrize("flag, value, message", [
    ("min_lr", 1e-5, "--min-lr 1e-05 differs"),
    ("lr_decay_style", "linear", "--lr-decay-style linear differs"),
    ("weight_decay", 0.1, "--weight-decay 0.1 differs"),
])
def test_a_changed_schedule_flag_is_an_error(flag, value, message):
    with pytest.raises(ResumeError, match=message):
        _plan(_cfg(**{flag: value}))
    assert _plan(_cfg(**{flag: value}, override_opt_param_scheduler=True)).override_schedule


def test_an_unchanged_default_is_not_a_request():
    """--lr left at its default on a run trained at 1e-3: keep the checkpoint's, say so."""
    plan = _plan(_cfg(lr=1e-5, lr_warmup_iters=None), wanted={
        "max_lr": 1e-5, "min_lr": 0.0, "lr_decay_style": "cosine", "warmup_iters": 0,
        "start_wd": 0.0, "train_iters": 20})
    assert "lr 0.001" in plan.notes[0]


@pytest.mark.parametrize("key, value, flag", [
    ("stats", "zzz", "the dataset's statistics (it was re-tokenized)"),
    ("split", "90,10,0", "--split '90,10,0'"), ("seed", 7, "--seed 7"),
    ("packing", False, "--no-packing False")])
def test_other_data_is_an_error_unless_reset(key, value, flag):
    with pytest.raises(ResumeError, match=re.escape(f"{flag} differs")):
        _plan(_cfg(), identity={**IDENTITY, key: value})
    assert _plan(_cfg(reset_data_position=True), identity={**IDENTITY, key: value}
                 ).data_position == 0


def test_which_iterations_a_run_saves():
    cfg = TrainConfig(load="/c", train_iters=10, save="/s", save_interval=4)
    assert [n for n in range(12) if _would_save_at(cfg, n)] == [4, 8, 10]
    cfg = TrainConfig(load="/c", train_iters=10, save="/s", exit_interval=3)
    assert [n for n in range(12) if _would_save_at(cfg, n)] == [3, 6, 9, 10]


def test_run_metadata_keeps_every_start(tmp_path):
    path = tmp_path / "run_metadata.json"
    path.write_text(json.dumps({"objective": "assistant-only", "pid": 1}))  # an older file
    merged = append_run(path, {"objective": "assistant-only", "pid": 2})
    assert merged["pid"] == 2 and [r["pid"] for r in merged["runs"]] == [1, 2]
    path.write_text(json.dumps(merged))
    assert [r["pid"] for r in append_run(path, {"pid": 3})["runs"]] == [1, 2, 3]


FSDP2 = optimizer_layout(fsdp="optim_grads_params", distributed=True, shards=2)


@pytest.mark.parametrize("saved, wanted, message", [
    (FSDP2, optimizer_layout(fsdp=None, distributed=False, shards=2),
     "saved with --use-megatron-fsdp --data-parallel-sharding-strategy optim_grads_params over 2 "
     "data-parallel rank(s), but this run uses neither --use-megatron-fsdp nor "
     "--use-distributed-optimizer"),
    (FSDP2, optimizer_layout(fsdp="optim_grads_params", distributed=True, shards=4),
     "over 2 data-parallel rank(s), but this run uses --use-megatron-fsdp "
     "--data-parallel-sharding-strategy optim_grads_params over 4"),
    (optimizer_layout(fsdp=None, distributed=True, shards=1), FSDP2,
     "saved with --use-distributed-optimizer, but this run uses --use-megatron-fsdp"),
])
def test_optimizer_state_of_another_sharding_is_an_error_naming_the_fix(saved, wanted, message):
    with pytest.raises(ResumeError, match=re.escape(message)) as e:
        check_optimizer_layout(saved, wanted, "/ckpt")
    assert "Resume with the checkpoint's setting, or pass --no-load-optim" in str(e.value)


def test_the_same_optimizer_layout_or_none_saved_passes():
    check_optimizer_layout(FSDP2, dict(FSDP2), "/ckpt")
    check_optimizer_layout(None, FSDP2, "/ckpt")  # a resharded checkpoint: no optimizer state
    # the distributed optimizer's file is gathered: any DP size loads it
    assert optimizer_layout(fsdp=None, distributed=True, shards=2) == \
        optimizer_layout(fsdp=None, distributed=True, shards=8)


# --- issue 30: Adam settings on resume, honest notes and saves ---------------------------------
ADAM = {"adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8}


def test_new_adam_settings_on_resume_are_an_error_or_taken_never_ignored():
    """Was: --adam-beta1 0.1 --adam-beta2 0.5 --adam-eps 1e-3 on resume, exit 0, and the next
    checkpoint still held the old betas and eps (the optimizer state replaced the flags)."""
    cfg = _cfg(adam_beta1=0.1, adam_beta2=0.5, adam_eps=1e-3)
    train_state = {"data_position": 40, "data": {**IDENTITY, "global_batch_size": 4}}
    kwargs = dict(iteration=10, saved_schedule=SAVED, saved_train_state=train_state,
                  wanted_schedule={"max_lr": 1e-3, "min_lr": 0.0, "lr_decay_style": "cosine",
                                   "warmup_iters": 2, "start_wd": 0.0, "train_iters": 20},
                  identity=IDENTITY, ckpt="/ckpt", saved_optimizer=ADAM)
    with pytest.raises(ResumeError, match=r"--adam-beta1 0.1 differs from the optimizer state of "
                                          r"the checkpoint being resumed \(/ckpt: 0.9\).*"
                                          "--override-opt-param-scheduler"):
        plan_resume(cfg, **kwargs)
    cfg.override_opt_param_scheduler = True
    plan = plan_resume(cfg, **kwargs)
    assert plan.optimizer_overrides == {"adam_beta1": 0.1, "adam_beta2": 0.5, "adam_eps": 1e-3}
    assert "--override-opt-param-scheduler: --adam-eps 0.001 replaces the checkpoint's 1e-08 " \
           "from iteration 10 on" in plan.notes
    # flags left at their defaults keep what the checkpoint trained with
    assert plan_resume(_cfg(), **{**kwargs, "saved_optimizer": {**ADAM, "adam_beta2": 0.999}}
                       ).optimizer_overrides == {}


def test_saved_optimizer_settings_are_found_in_megatron_cores_nesting():
    from megatron.sft.training.resume import apply_optimizer_settings, saved_optimizer_settings

    group = {"betas": (0.8, 0.99), "eps": 1e-6, "params": [0]}
    # ChainedOptimizer -> [Float16Optimizer: {"optimizer": torch's state_dict}]
    assert saved_optimizer_settings([{"optimizer": {"state": {}, "param_groups": [group]}}]) == \
        {"adam_beta1": 0.8, "adam_beta2": 0.99, "adam_eps": 1e-6}
    assert saved_optimizer_settings({"optimizer": {"state": {}}}) is None

    class Opt:
        param_groups = [dict(group), dict(group)]

    apply_optimizer_settings(Opt, {"adam_beta2": 0.5})
    assert [(g["betas"], g["eps"]) for g in Opt.param_groups] == [((0.8, 0.5), 1e-6)] * 2


def test_train_iters_at_the_checkpoint_says_no_lr_range():
    """Was: 'iterations 61-60 run at lr 0' when --train-iters equals the checkpoint's."""
    cfg = _cfg(train_iters=10)
    plan = plan_resume(cfg, iteration=10, saved_schedule={**SAVED, "lr_decay_steps": 20},
                       saved_train_state={"data_position": 40,
                                          "data": {**IDENTITY, "global_batch_size": 4}},
                       wanted_schedule={"max_lr": 1e-3, "min_lr": 0.0, "warmup_iters": 2,
                                        "lr_decay_style": "cosine", "start_wd": 0.0,
                                        "train_iters": 10},
                       identity=IDENTITY, ckpt="/ckpt")
    assert not [n for n in plan.notes if "run at lr" in n], plan.notes


def test_a_resumed_run_is_refused_only_for_iterations_it_can_save():
    """Was: resuming at 6 with --save-interval 1 refused for 'would save iteration 1'."""
    cfg = _cfg(save="/s", save_interval=1, train_iters=8)
    assert _would_save_at(cfg, 1) and not _would_save_at(cfg, 1, start=6)
    assert _would_save_at(cfg, 7, start=6) and not _would_save_at(cfg, 6, start=6)
