"""SFT training on megatron-core under gloo: exact loss vs transformers, invariance to how the
global batch is split, TP/PP agreement, exact resume, and learning.

Every run of this module that needs the same number of ranks shares one launch
(``batch_worker.py``): the fixtures below list them, each test checks its own."""

import math

import pytest

from sft_testing import check_generations_against_hf, run_batch


def _config(ckpt, data, **overrides):
    cfg = dict(load=ckpt, data_path=data, seq_length=128, micro_batch_size=2,
               global_batch_size=8, train_iters=3, lr=1e-3, lr_decay_style="constant",
               no_progress=True, split="90,10,0", clip_grad=0.0)
    cfg.update(overrides)
    return cfg


def _train(config):
    return {"kind": "train", "mode": "train", "config": config}


def _hf_loss(config, hf):
    return {"kind": "train", "mode": "hf_loss", "config": config, "hf": str(hf)}


# layouts differ in the model, not in the rows; sdpa == dense at every layout is
# test_attention_in_model.py
LOSS_CASES = [(1, 1, True, "sdpa"), (2, 1, True, "sdpa"), (1, 2, True, "sdpa"),
              (1, 1, False, "sdpa"), (1, 1, True, "dense")]
RESUME_CASES = [(True, False), (False, False), (True, True)]  # distributed optimizer, bf16
CURVE = dict(train_iters=5)
GBS = dict(global_batch_size=4, train_iters=3)
RESUME = dict(train_iters=4, lr_decay_style="cosine", lr_warmup_iters=1)
OVERLAP = dict(train_iters=4, micro_batch_size=1, use_distributed_optimizer=True, eval_interval=3,
               eval_iters=1, save_interval=2, lr_decay_style="cosine")


def _loss_name(tp, pp, packing, backend):
    return f"loss-tp{tp}pp{pp}-{'packed' if packing else 'unpacked'}-{backend}"


def _scenarios(world, sft_assets, checkpoints, root):
    """Every run of this module on ``world`` ranks, by name."""
    data, hf, ck = sft_assets["data"], sft_assets["hf"], checkpoints
    out = {}
    for tp, pp, packing, backend in LOSS_CASES:
        if tp * pp == world:
            out[_loss_name(tp, pp, packing, backend)] = _hf_loss(_config(
                ck[(tp, pp)], data, packing=packing, attention_backend=backend,
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), hf)
    if world == 1:
        out["gbs-1x4"] = _train(_config(ck[(1, 1)], data, micro_batch_size=1, **GBS))
        out["gbs-4x1"] = _train(_config(ck[(1, 1)], data, micro_batch_size=4, **GBS))
        out["curve-single"] = _train(_config(ck[(1, 1)], data, **CURVE))
        for granularity in ("full", "selective"):
            out[f"curve-recompute-{granularity}"] = _train(_config(
                ck[(1, 1)], data, recompute_granularity=granularity, **CURVE))
        out["learn"] = _train(_config(
            ck[(1, 1)], data, train_iters=30, lr=3e-3, lr_decay_style="cosine",
            lr_warmup_iters=3, global_batch_size=8, micro_batch_size=8, eval_interval=30,
            eval_iters=1))
        # The same token file without its loss-mask twin is plain pretraining data.
        import shutil

        for ext in (".bin", ".idx"):
            shutil.copy(data + "_text_document" + ext, str(root / ("cpt_text_document" + ext)))
        out["cpt-loss"] = _hf_loss(_config(ck[(1, 1)], str(root / "cpt")), hf)
        out["sft-loss"] = _hf_loss(_config(ck[(1, 1)], data), hf)
    if world == 2:
        out["gbs-dp2"] = _train(_config(ck[(1, 1)], data, micro_batch_size=1,
                                        use_distributed_optimizer=True, **GBS))
        # interleaved 1F1B: 4 layers as 2 virtual stages of 1 layer on each of 2 ranks
        out["curve-PP2VPP2"] = _train(_config(
            ck["vpp"], data, pipeline_model_parallel_size=2,
            num_layers_per_virtual_pipeline_stage=1, **CURVE))
        for distributed_optimizer, bf16 in RESUME_CASES:
            # bf16: model weights in bf16, fp32 master weights in the optimizer state; both must
            # resume. One run saves at iteration 2 and goes on to 4; a second run resumes from
            # that save (the tracker file pointed back at it, as a user rolls back) and must
            # redo 3 and 4 exactly.
            name, save = f"resume-{distributed_optimizer}-{bf16}", root / f"resume-{distributed_optimizer}-{bf16}"
            common = dict(use_distributed_optimizer=distributed_optimizer, bf16=bf16, **RESUME)
            out[name + "-straight"] = _train(_config(ck[(1, 1)], data, save=str(save),
                                                     save_interval=2, **common))
            out[name + "-resumed"] = {**_train(_config(str(save), data,
                                                       save=str(root / (name + "-run2")),
                                                       **common)),
                                      "before": [{"set_latest": [str(save), 2]}]}
        # DP2 with the distributed optimizer; a save and an evaluation mid-run must see the
        # newest weights although overlapped parameter gathering delivers them in the next
        # forward.
        for name, extra in [("overlap", {}),
                            ("plain", dict(overlap_grad_reduce=False,
                                           overlap_param_gather=False))]:
            out[f"ddp-{name}"] = {"kind": "train", "mode": "train_ddp", "config": _config(
                ck[(1, 1)], data, save=str(root / name), **OVERLAP, **extra)}
        # --load HF_DIR (converted in memory, each rank its shard) at TP2 and PP2: the same
        # loss as from the converted checkpoints above; then a run that saves and writes
        # --save-hf every iteration, its re-run (the same command) resuming from --save, and
        # a LoRA run from the HF dir (its base converted once into SAVE/base at the first save)
        for tp, pp in ((2, 1), (1, 2)):
            out[f"hf-direct-tp{tp}pp{pp}"] = {"kind": "train", "mode": "loss", "config": _config(
                str(hf), data, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)}
        hf_run = dict(save=str(root / "hf-run"), save_hf=str(root / "hf-run-export"),
                      save_hf_interval=1, tensor_model_parallel_size=2, train_iters=2)
        out["hf-save-hf"] = _train(_config(str(hf), data, **hf_run))
        out["hf-resume"] = _train(_config(str(hf), data, **{**hf_run, "train_iters": 3}))
        out["hf-lora"] = _train(_config(
            str(hf), data, lora_rank=4, train_iters=2, save=str(root / "hf-lora"),
            save_hf=str(root / "hf-lora-merged"), save_hf_adapter=str(root / "hf-lora-peft")))
        _generation_scenarios(out, sft_assets, ck, root)
    if world == 4:
        out["curve-TP2PP2"] = _train(_config(ck[(2, 2)], data, tensor_model_parallel_size=2,
                                             pipeline_model_parallel_size=2, **CURVE))
    return out


# --eval-generate: 32 greedy tokens of 2 validation prompts at iteration 2, from an HF model with
# large random weights (initializer_range 0.3: varied tokens, decisive logits) loaded at TP2 and
# PP2; and a PP2 x VPP2 run with and without it (the same evaluations otherwise)
GENERATE = dict(train_iters=2, eval_interval=2, eval_iters=1, eval_generate=2,
                eval_generate_tokens=32, lr=1e-4)
GENERATE_CURVE = dict(train_iters=4, eval_interval=2, eval_iters=1, pipeline_model_parallel_size=2,
                      num_layers_per_virtual_pipeline_stage=1)


def _generation_scenarios(out, sft_assets, ck, root):
    from transformers import AutoTokenizer

    from megatron.sft.bridge.random_hf_model import make_random_hf_model

    vocab = len(AutoTokenizer.from_pretrained(sft_assets["tokenizer"]))
    hf = make_random_hf_model("Qwen2ForCausalLM", root / "gen-hf", seed=3,
                              overrides=dict(vocab_size=vocab, initializer_range=0.3))
    for tp, pp in ((2, 1), (1, 2)):
        name = f"gen-tp{tp}pp{pp}"
        out[name] = _train(_config(str(hf), sft_assets["data"], tensor_model_parallel_size=tp,
                                   pipeline_model_parallel_size=pp, save=str(root / name),
                                   save_hf=str(root / (name + "-hf")), **GENERATE))
    for name, extra in (("off", {}), ("on", dict(eval_generate=2, eval_generate_tokens=8))):
        out[f"gen-curve-{name}"] = {"kind": "train", "mode": "train_rng", "config": _config(
            ck["vpp"], sft_assets["data"], **GENERATE_CURVE, **extra)}


def _batch(world, sft_assets, checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"sft-world{world}")
    return run_batch(root, world, _scenarios(world, sft_assets, checkpoints, root))


@pytest.fixture(scope="module")
def world1(sft_assets, checkpoints, tmp_path_factory):
    return _batch(1, sft_assets, checkpoints, tmp_path_factory)


@pytest.fixture(scope="module")
def world2(sft_assets, checkpoints, tmp_path_factory):
    return _batch(2, sft_assets, checkpoints, tmp_path_factory)


@pytest.fixture(scope="module")
def world4(sft_assets, checkpoints, tmp_path_factory):
    return _batch(4, sft_assets, checkpoints, tmp_path_factory)


def _world(request, n):
    return request.getfixturevalue(f"world{n}")


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("tp, pp, packing, backend", LOSS_CASES)
def test_loss_equals_transformers(tp, pp, packing, backend, request):
    r = _world(request, tp * pp)[_loss_name(tp, pp, packing, backend)]
    assert r["megatron_tokens"] == r["hf_tokens"] > 0
    if packing:
        assert r["packed_samples_per_row"] > 1.5  # the packed path really packs
    assert abs(r["megatron"] - r["hf"]) <= 1e-5 * r["hf"], r


@pytest.mark.xdist_group("multiprocess")
def test_global_batch_split_does_not_change_loss_or_grads(world1, world2):
    runs = {"1x4": world1["gbs-1x4"], "4x1": world1["gbs-4x1"], "dp2": world2["gbs-dp2"]}
    ref = runs["1x4"]
    for name, hist in runs.items():
        for a, b in zip(ref, hist):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (name, a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (name, a, b)
            assert a["loss_tokens"] == b["loss_tokens"]


@pytest.mark.xdist_group("multiprocess")
def test_curve_is_independent_of_layout_and_recompute(world1, world2, world4):
    single = world1["curve-single"]
    assert len(single) == 5 and single[-1]["loss"] < single[0]["loss"]
    split = {"TP2PP2": world4["curve-TP2PP2"], "PP2VPP2": world2["curve-PP2VPP2"]}
    for name, curve in split.items():
        assert len(curve) == 5, name
        for a, b in zip(single, curve):
            assert abs(a["loss"] - b["loss"]) <= 1e-4, (name, a, b)
    # Recomputed activations are the same numbers: the curve is equal to fp32 rounding.
    for granularity in ("full", "selective"):
        rec = world1[f"curve-recompute-{granularity}"]
        for a, b in zip(single, rec):
            assert abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"], (granularity, a, b)


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("distributed_optimizer, bf16", RESUME_CASES)
def test_resume_is_exact(distributed_optimizer, bf16, world2):
    name = f"resume-{distributed_optimizer}-{bf16}"
    straight, resumed = world2[name + "-straight"], world2[name + "-resumed"]
    assert [h["iteration"] for h in straight] == [1, 2, 3, 4]
    assert world2.latest_before(name + "-resumed") == "4"
    assert [h["iteration"] for h in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        assert a["iteration"] == b["iteration"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0), (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)


@pytest.mark.xdist_group("multiprocess")
def test_tiny_model_learns(world1):
    hist = world1["learn"]
    start, end = hist[0]["loss"], hist[-1]["loss"]
    assert math.isfinite(end) and end < 0.5 * start, (start, end)
    assert hist[-1]["valid_loss"] < 0.6 * start


@pytest.mark.xdist_group("multiprocess")
def test_continued_pretraining_loss_covers_every_token(world1):
    r, sft = world1["cpt-loss"], world1["sft-loss"]
    assert r["megatron_tokens"] == r["hf_tokens"] > 2 * sft["hf_tokens"]
    assert abs(r["megatron"] - r["hf"]) <= 1e-5 * r["hf"], r


@pytest.mark.xdist_group("multiprocess")
def test_data_parallel_overlap_is_on_by_default_and_keeps_the_curve(world2):
    runs = {name: world2[f"ddp-{name}"] for name in ("overlap", "plain")}
    assert runs["overlap"]["overlap_grad_reduce"] and runs["overlap"]["overlap_param_gather"]
    assert not runs["plain"]["overlap_grad_reduce"] and not runs["plain"]["overlap_param_gather"]
    for a, b in zip(runs["overlap"]["history"], runs["plain"]["history"]):
        for key in ("loss", "grad_norm", "valid_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6), (key, a, b)
    # The mid-run checkpoint holds the weights after step 2 in both runs.
    import torch

    def weights(run):
        state = torch.load(world2.root / run / "iter_0000002" / "mp_rank_00" /
                           "model_optim_rng.pt", weights_only=True, map_location="cpu")
        return state["model"]

    a, b = weights("overlap"), weights("plain")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_load_hf_dir_gives_the_converted_checkpoints_loss(tp, pp, world2):
    direct = world2[f"hf-direct-tp{tp}pp{pp}"]
    converted = world2[_loss_name(tp, pp, True, "sdpa")]
    assert direct["megatron_tokens"] == converted["megatron_tokens"] > 0
    assert direct["megatron"] == converted["megatron"]  # bit for bit


def _safetensors(directory):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same_tensors(a, b):
    import torch

    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.xdist_group("multiprocess")
def test_save_hf_equals_merge_and_export_and_records_the_source(world2, sft_assets):
    import json

    from megatron.sft.bridge.checkpoint_io import iteration_dir, read_metadata
    from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf

    assert [h["iteration"] for h in world2["hf-save-hf"]] == [1, 2]
    assert [h["iteration"] for h in world2["hf-resume"]] == [3]  # resumed from --save
    run, exported = world2.root / "hf-run", world2.root / "hf-run-export"
    assert json.loads((exported / "export_source.json").read_text())["iteration"] == 3
    meta = read_metadata(iteration_dir(run))
    assert meta.producer == "training"
    assert meta.hf_source["path"] == str(sft_assets["hf"].resolve())
    assert (run / "hf_reference" / "config.json").is_file()
    reference = export_megatron_to_hf(run, world2.root / "hf-run-script", run / "hf_reference",
                                      ExportOptions(progress=False))
    _same_tensors(_safetensors(exported), _safetensors(reference))
    assert json.loads((exported / "config.json").read_text()) == \
        json.loads((reference / "config.json").read_text())


@pytest.mark.xdist_group("multiprocess")
def test_lora_from_hf_dir_names_a_converted_base_and_exports(world2):
    from megatron.sft.bridge.checkpoint_io import iteration_dir
    from megatron.sft.bridge.export import ExportOptions, export_megatron_to_hf
    from megatron.sft.lora.merge import open_checkpoint
    from megatron.sft.lora.run_format import read_lora_info

    assert [h["iteration"] for h in world2["hf-lora"]] == [1, 2]
    run = world2.root / "hf-lora"
    info = read_lora_info(iteration_dir(run))
    assert info.base_checkpoint == str((run / "base").resolve()) and info.base_fingerprint
    assert (world2.root / "hf-lora-peft" / "adapter_model.safetensors").is_file()
    reference = export_megatron_to_hf(open_checkpoint(run), world2.root / "hf-lora-script",
                                      None, ExportOptions(progress=False))
    _same_tensors(_safetensors(world2.root / "hf-lora-merged"), _safetensors(reference))



@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_eval_generations_equal_transformers_generate(tp, pp, world2, sft_assets):
    history = world2[f"gen-tp{tp}pp{pp}"]
    assert [h["iteration"] for h in history] == [1, 2] and "generations" not in history[0]
    # the export holds the weights of iteration 2, which generated
    check_generations_against_hf(history[-1]["generations"], world2.root / f"gen-tp{tp}pp{pp}-hf",
                                 sft_assets, 32)


@pytest.mark.xdist_group("multiprocess")
def test_eval_generate_does_not_change_training(world2):
    off, on = world2["gen-curve-off"], world2["gen-curve-on"]
    assert [len(h["generations"]) for h in on["history"] if "generations" in h] == [2, 2]
    assert on["history"][1]["generations"][0]["new_tokens"] >= 1
    assert off["rng"] == on["rng"]  # the same RNG states after training
    keys = ("loss", "grad_norm", "valid_loss", "loss_tokens", "lr", "consumed_samples")
    for a, b in zip(off["history"], on["history"], strict=True):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}  # bit for bit
