"""SFT training on megatron-core under gloo: exact loss vs transformers, invariance to how the
global batch is split, TP/PP agreement, exact resume, and learning."""

import json
import math
from pathlib import Path

import pytest

from sft_testing import run_torchrun

WORKER = Path(__file__).with_name("train_worker.py")


def _config(ckpt, data, **overrides):
    cfg = dict(load=ckpt, data_path=data, seq_length=128, micro_batch_size=2,
               global_batch_size=8, train_iters=3, lr=1e-3, lr_decay_style="constant",
               no_progress=True, split="90,10,0", clip_grad=0.0)
    cfg.update(overrides)
    return cfg


def _launch(tmp_path, name, nproc, mode, config, hf=None):
    spec = {"mode": mode, "out": str(tmp_path / f"{name}.json"), "config": config, "hf": hf}
    (tmp_path / f"{name}.spec.json").write_text(json.dumps(spec))
    proc = run_torchrun(nproc, WORKER, str(tmp_path / f"{name}.spec.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((tmp_path / f"{name}.json").read_text())


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("tp, pp, packing, backend", [
    (1, 1, True, "sdpa"), (2, 1, True, "sdpa"), (1, 2, True, "sdpa"),
    (1, 1, False, "sdpa"), (1, 1, True, "dense"),
])  # layouts differ in the model, not in the rows; sdpa == dense at every layout is
#     test_attention_in_model.py
def test_loss_equals_transformers(tp, pp, packing, backend, sft_assets, checkpoints, tmp_path):
    r = _launch(tmp_path, "loss", tp * pp, "hf_loss", _config(
        checkpoints[(tp, pp)], sft_assets["data"], packing=packing, attention_backend=backend,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), hf=str(sft_assets["hf"]))
    assert r["megatron_tokens"] == r["hf_tokens"] > 0
    if packing:
        assert r["packed_samples_per_row"] > 1.5  # the packed path really packs
    assert abs(r["megatron"] - r["hf"]) <= 1e-5 * r["hf"], r


@pytest.mark.xdist_group("multiprocess")
def test_global_batch_split_does_not_change_loss_or_grads(sft_assets, checkpoints, tmp_path):
    base = dict(global_batch_size=4, train_iters=3)
    runs = {
        "1x4": _launch(tmp_path, "a", 1, "train", _config(
            checkpoints[(1, 1)], sft_assets["data"], micro_batch_size=1, **base)),
        "4x1": _launch(tmp_path, "b", 1, "train", _config(
            checkpoints[(1, 1)], sft_assets["data"], micro_batch_size=4, **base)),
        "dp2": _launch(tmp_path, "c", 2, "train", _config(
            checkpoints[(1, 1)], sft_assets["data"], micro_batch_size=1,
            use_distributed_optimizer=True, **base)),
    }
    ref = runs["1x4"]
    for name, hist in runs.items():
        for a, b in zip(ref, hist):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (name, a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (name, a, b)
            assert a["loss_tokens"] == b["loss_tokens"]


@pytest.mark.xdist_group("multiprocess")
def test_curve_is_independent_of_layout_and_recompute(sft_assets, checkpoints, tmp_path):
    common = dict(train_iters=5)
    single = _launch(tmp_path, "s", 1, "train", _config(checkpoints[(1, 1)], sft_assets["data"],
                                                        **common))
    assert len(single) == 5 and single[-1]["loss"] < single[0]["loss"]
    split = {
        "TP2PP2": _launch(tmp_path, "tp2pp2", 4, "train", _config(
            checkpoints[(2, 2)], sft_assets["data"], tensor_model_parallel_size=2,
            pipeline_model_parallel_size=2, **common)),
        # interleaved 1F1B: 4 layers as 2 virtual stages of 1 layer on each of 2 ranks
        "PP2VPP2": _launch(tmp_path, "vpp", 2, "train", _config(
            checkpoints["vpp"], sft_assets["data"], pipeline_model_parallel_size=2,
            num_layers_per_virtual_pipeline_stage=1, **common)),
    }
    for name, curve in split.items():
        assert len(curve) == 5, name
        for a, b in zip(single, curve):
            assert abs(a["loss"] - b["loss"]) <= 1e-4, (name, a, b)
    # Recomputed activations are the same numbers: the curve is equal to fp32 rounding.
    for granularity in ("full", "selective"):
        rec = _launch(tmp_path, granularity, 1, "train", _config(
            checkpoints[(1, 1)], sft_assets["data"], recompute_granularity=granularity,
            **common))
        for a, b in zip(single, rec):
            assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"], (granularity, a, b)


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("distributed_optimizer, bf16", [(True, False), (False, False),
                                                         (True, True)])
def test_resume_is_exact(distributed_optimizer, bf16, sft_assets, checkpoints, tmp_path):
    # bf16: model weights in bf16, fp32 master weights in the optimizer state; both must resume.
    # One run saves at iteration 2 and goes on to 4; a second run resumes from that save (the
    # tracker file pointed back at it, as a user rolls back) and must redo 3 and 4 exactly.
    common = dict(train_iters=4, lr_decay_style="cosine", lr_warmup_iters=1,
                  use_distributed_optimizer=distributed_optimizer, bf16=bf16)
    save = tmp_path / "run"
    straight = _launch(tmp_path, "straight", 2, "train", _config(
        checkpoints[(1, 1)], sft_assets["data"], save=str(save), save_interval=2, **common))
    assert [h["iteration"] for h in straight] == [1, 2, 3, 4]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    (save / "latest_checkpointed_iteration.txt").write_text("2\n")
    resumed = _launch(tmp_path, "resumed", 2, "train", _config(
        str(save), sft_assets["data"], save=str(tmp_path / "run2"), **common))
    assert [h["iteration"] for h in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        assert a["iteration"] == b["iteration"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0), (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)


@pytest.mark.xdist_group("multiprocess")
def test_tiny_model_learns(sft_assets, checkpoints, tmp_path):
    hist = _launch(tmp_path, "learn", 1, "train", _config(
        checkpoints[(1, 1)], sft_assets["data"], train_iters=30, lr=3e-3,
        lr_decay_style="cosine", lr_warmup_iters=3, global_batch_size=8, micro_batch_size=8,
        eval_interval=30, eval_iters=1))
    start, end = hist[0]["loss"], hist[-1]["loss"]
    assert math.isfinite(end) and end < 0.5 * start, (start, end)
    assert hist[-1]["valid_loss"] < 0.6 * start


@pytest.mark.xdist_group("multiprocess")
def test_continued_pretraining_loss_covers_every_token(sft_assets, checkpoints, tmp_path):
    import shutil

    # The same token file without its loss-mask twin is plain pretraining data.
    for ext in (".bin", ".idx"):
        shutil.copy(sft_assets["data"] + "_text_document" + ext,
                    str(tmp_path / ("cpt_text_document" + ext)))
    r = _launch(tmp_path, "cpt", 1, "hf_loss", _config(checkpoints[(1, 1)], str(tmp_path / "cpt")),
                hf=str(sft_assets["hf"]))
    sft = _launch(tmp_path, "sft", 1, "hf_loss", _config(checkpoints[(1, 1)], sft_assets["data"]),
                  hf=str(sft_assets["hf"]))
    assert r["megatron_tokens"] == r["hf_tokens"] > 2 * sft["hf_tokens"]
    assert abs(r["megatron"] - r["hf"]) <= 1e-5 * r["hf"], r


@pytest.mark.xdist_group("multiprocess")
def test_data_parallel_overlap_is_on_by_default_and_keeps_the_curve(sft_assets, checkpoints,
                                                                     tmp_path):
    # DP2 with the distributed optimizer; a save and an evaluation mid-run must see the newest
    # weights although overlapped parameter gathering delivers them in the next forward.
    common = dict(train_iters=4, micro_batch_size=1, use_distributed_optimizer=True,
                  eval_interval=3, eval_iters=1, save_interval=2, lr_decay_style="cosine")
    runs = {}
    for name, extra in [("overlap", {}),
                        ("plain", dict(overlap_grad_reduce=False, overlap_param_gather=False))]:
        runs[name] = _launch(tmp_path, name, 2, "train_ddp", _config(
            checkpoints[(1, 1)], sft_assets["data"], save=str(tmp_path / name), **common,
            **extra))
    assert runs["overlap"]["overlap_grad_reduce"] and runs["overlap"]["overlap_param_gather"]
    assert not runs["plain"]["overlap_grad_reduce"] and not runs["plain"]["overlap_param_gather"]
    for a, b in zip(runs["overlap"]["history"], runs["plain"]["history"]):
        for key in ("loss", "grad_norm", "valid_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6), (key, a, b)
    # The mid-run checkpoint holds the weights after step 2 in both runs.
    import torch

    def weights(run):
        state = torch.load(tmp_path / run / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt",
                           weights_only=True, map_location="cpu")
        return state["model"]

    a, b = weights("overlap"), weights("plain")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
