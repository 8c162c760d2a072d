"""The profile: regions labelled in our code, a torch.profiler run, time by category."""

from __future__ import annotations

import collections
import gzip
import re
import shutil
import time
from pathlib import Path
from typing import Any

from gpu_proof_parts.profile_rules import CATEGORIES, classify
from gpu_proof_parts import throughput  # imports this module back: use at call time


def _label_regions(trainer):
    """``record_function`` labels around our own code for the profile (see PROFILE_RULES),
    installed on this Trainer's instance and modules only; returns an undo function."""
    from torch.profiler import record_function

    from megatron.sft.model.attention import PackedCoreAttention
    from megatron.sft.training import forward as forward_mod

    def labelled(fn, label):
        def wrapper(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return wrapper

    undo = []
    fl = trainer.forward_loss  # the trainer's ForwardLoss cuts the micro-batches
    fl.microbatches = labelled(fl.microbatches, "sft::data")
    undo.append(lambda: fl.__dict__.pop("microbatches", None))
    opt = trainer.optimizer
    for name in ("step", "zero_grad"):
        setattr(opt, name, labelled(getattr(opt, name), "sft::optimizer"))
        undo.append(lambda n=name: opt.__dict__.pop(n, None))
    trainer.scheduler.step = labelled(trainer.scheduler.step, "sft::optimizer")
    undo.append(lambda: trainer.scheduler.__dict__.pop("step", None))
    for m in trainer.model:
        m.zero_grad_buffer = labelled(m.zero_grad_buffer, "sft::optimizer")
        undo.append(lambda m=m: m.__dict__.pop("zero_grad_buffer", None))
        for mod in m.modules():
            if isinstance(mod, PackedCoreAttention):
                mod.kernel = labelled(mod.kernel, "sft::attention")
    original_loss = forward_mod.vocab_parallel_token_loss
    forward_mod.vocab_parallel_token_loss = labelled(original_loss, "sft::loss")
    undo.append(lambda: setattr(forward_mod, "vocab_parallel_token_loss", original_loss))
    return lambda: [u() for u in undo]


def _profile(args, best: dict, prep: dict) -> dict:
    """1 warm-up + 2 profiled iterations of ``best``; time by category."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    c = {k: best[k] for k in ("key", "seq", "backend", "recompute", "gbs")}
    print(f"## profile of {c['key']}: building", flush=True)
    t0 = time.time()
    row: dict[str, Any] = {"key": "profile", "config": c["key"], "status": "ok",
                           "iterations": 2}
    box: list = []
    undo = None
    cuda = torch.cuda.is_available() and args.device == "cuda"
    try:
        box.append(throughput._trainer(args, c, prep, 3))
        trainer = box[0]
        trainer.setup()
        undo = _label_regions(trainer)
        trainer.train_step()  # warm-up (and flex's compile, were this a fresh process)
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, record_shapes=False) as prof:
            t1 = time.perf_counter()
            for _ in range(2):
                trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t1
        t2 = time.time()
        row.update(profile_categories(prof.events(), cuda))
        if not row["total_ms"]:
            raise RuntimeError("the profiler recorded no " + ("CUDA kernels (CUPTI?)" if cuda
                                                                 else "ops"))
        row["wall_ms"] = round(wall * 1e3, 1)
        row["busy_pct"] = round(100 * row["total_ms"] / row["wall_ms"], 1) if wall else None
        row["parse_s"] = round(time.time() - t2, 1)
        row["trace"] = None
        if args.trace:  # written at the end, if time is left: the 16k flex numbers come first
            _KEPT_PROFILE[:] = [prof]
    except Exception as e:
        row["status"] = "OOM" if throughput._is_oom(e) else "error"
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        import traceback

        traceback.print_exc()
    finally:
        if undo is not None:
            undo()
        trainer = undo = None  # the undo closures hold the Trainer too
        throughput._release(box)
    row["wall_s"] = round(time.time() - t0, 1)
    return row


#: the last profile, kept for --trace until the worker's other configurations are done
_KEPT_PROFILE: list = []


def _export_trace(args, deadline: float) -> str:
    """OUT/trace.json.gz from the kept profile, when it fits 15 MB and the time left."""
    if not _KEPT_PROFILE:
        return "no profile kept"
    if deadline - time.time() < (5 if args.tiny else 30):
        return "not written: too little time left in the throughput budget"
    prof = _KEPT_PROFILE.pop()
    raw = Path(args.workdir) / "trace.json"
    prof.export_chrome_trace(str(raw))
    target = Path(args.out) / "trace.json.gz"
    with open(raw, "rb") as src, gzip.open(target, "wb", compresslevel=5) as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    if target.stat().st_size > 15 * 2**20:
        target.unlink()
        return "not kept: over 15 MB gzipped (the run tool returns 16 MB a file)"
    return target.name


def profile_categories(events, cuda: bool) -> dict:
    """Time by category (:data:`PROFILE_RULES`) of a profile's events: CUDA kernel time on a
    GPU, each op's self CPU time on CPU. Returns ms and shares per category, the total, and the
    40 biggest kernels (or ops) with their category, so the rules can be checked."""
    from torch.autograd import DeviceType

    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]
    device_events = [e for e in events if e.device_type == DeviceType.CUDA]
    # record_function ranges also appear on the GPU timeline ("gpu_user_annotation") and may be
    # attached to a CPU op like a kernel: they are not GPU work (torch's own tables skip them)
    annotations = {e.name for e in device_events if getattr(e, "is_user_annotation", False)}
    chains: dict[int, str] = {}

    def chain(e) -> str:
        key = id(e)
        if key not in chains:
            names, node = [], e
            while node is not None and len(names) < 40:
                names.append(node.name)
                node = node.cpu_parent
            chains[key] = " <- ".join(names)
        return chains[key]

    # forward ops' labels by autograd sequence number, for the kernels of the backward pass
    labels_by_seq: dict[int, set] = collections.defaultdict(set)
    for e in cpu_events:
        if e.sequence_nr is not None and e.sequence_nr >= 0:
            text = chain(e)
            if "evaluate_function" not in text:
                labels_by_seq[e.sequence_nr].update(re.findall(r"sft::\w+", text))

    def backward_labels(e) -> str:
        node = e
        while node is not None:
            if node.name.startswith("autograd::engine::evaluate_function"):
                found = labels_by_seq.get(node.sequence_nr, ())
                return (" <- fwd: " + " ".join(sorted(found))) if found else ""
            node = node.cpu_parent
        return ""

    ms = dict.fromkeys(CATEGORIES, 0.0)
    per_name: dict[tuple[str, str], list] = {}
    attributed = 0.0
    for e in cpu_events:
        if cuda:
            items = [(k.name, k.duration) for k in e.kernels if k.name not in annotations]
            text = None
        else:
            items = [(e.name, e.self_cpu_time_total)] if e.self_cpu_time_total > 0 else []
            text = None
        for name, us in items:
            if text is None:
                text = (chain(e) if cuda else chain(e.cpu_parent) if e.cpu_parent else "") + \
                    backward_labels(e)
            cat = classify(name, text)
            ms[cat] += us / 1e3
            attributed += us / 1e3
            entry = per_name.setdefault((name, cat), [0, 0.0])
            entry[0] += 1
            entry[1] += us / 1e3
    unattributed = 0.0
    if cuda:
        total_device = sum(e.time_range.elapsed_us() for e in device_events
                           if not getattr(e, "is_user_annotation", False)) / 1e3
        unattributed = max(total_device - attributed, 0.0)
        ms["other"] += unattributed
    total = sum(ms.values())
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:40]
    return {"ms": {k: round(v, 2) for k, v in ms.items()},
            "shares": {k: round(100 * v / total, 1) if total else 0.0 for k, v in ms.items()},
            "total_ms": round(total, 2), "unattributed_ms": round(unattributed, 2),
            "what": "CUDA kernel time" if cuda else "self CPU time of ops",
            "top": [{"name": n[:160], "category": cat, "count": cnt, "ms": round(t, 3)}
                    for (n, cat), (cnt, t) in top]}
