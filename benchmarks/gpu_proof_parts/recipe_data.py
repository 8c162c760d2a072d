"""The recipe step's child: synthetic reasoning conversations, tokenized, and the recipe scripts run."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

from gpu_proof_parts import hf_forward  # imports this module back: use at call time
from gpu_proof_parts.probes import _configs, _runnable, probe
from gpu_proof_parts.processes import run_script, _paths, _read_json, _wait_for, _write_json
from gpu_proof_parts.settings import REPO, TINY_QWEN2


_SYLLABLES = ("ka", "ri", "to", "men", "sa", "lo", "vi", "der", "an", "el", "qu", "or", "is", "un",
              "pe", "ta", "mo", "ner", "si", "gal", "bo", "ex", "tri", "fu", "ly", "zo", "ham", "wi")


def synthetic_reasoning_conversations(count: int, max_tokens: int, seed: int = 0
                                      ) -> list[dict]:
    """``count`` conversations in the ``messages`` format, each assistant turn a ``<think>``
    block (the reasoning) and an answer; target lengths long-tailed like reasoning traces
    (``bench_train_gpu.reasoning_lengths``, in words, about 0.6 of ``max_tokens`` at most).
    Every fourth is two-turn (the R1 template drops the first turn's ``<think>`` part)."""
    from bench_train_gpu import reasoning_lengths

    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
                    for _ in range(600)})
    lengths = reasoning_lengths(count, int(max_tokens * 0.6), seed=seed)

    def sentence(n: int) -> str:
        out = []
        while len(out) < n:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            out += rng.sample(words, 6) + [f"so {a} + {b} = {a + b}."]
        return " ".join(out[:n])

    convs = []
    for i, n in enumerate(int(x) for x in lengths):
        turns = 2 if i % 4 == 3 else 1
        msgs = []
        for t in range(turns):
            think = max(n // turns - 24, 8)
            msgs.append({"role": "user", "content": f"Problem {i}.{t}: {sentence(12)}?"})
            msgs.append({"role": "assistant",
                         "content": f"<think>\n{sentence(think)}\n</think>\n\n"
                                    f"The answer is {sentence(10)}"})
        convs.append({"messages": msgs})
    return convs


def _fit_conversations(convs: list[dict], tok, max_tokens: int) -> list[dict]:
    """Shorten any conversation whose rendered length exceeds ``max_tokens`` (so the
    tokenizer's MAX_LEN never drops one)."""
    out = []
    for conv in convs:
        for _ in range(6):
            text = tok.apply_chat_template(conv["messages"], tokenize=False)
            n = len(tok(text, add_special_tokens=False)["input_ids"])
            if n <= max_tokens:
                break
            keep = max_tokens / n * 0.9
            for m in conv["messages"]:
                if m["role"] == "assistant":
                    head, _, rest = m["content"].partition("\n</think>")
                    body = head.split(" ")
                    m["content"] = " ".join(body[:max(int(len(body) * keep), 4)]) + \
                        "\n</think>" + rest
        out.append(conv)
    return out


def child_prep(args) -> int:
    """The setup probe, then every input of the throughput and recipe steps (CPU only): run
    in the background."""
    p = _paths(args)
    try:
        info = probe(args)
    except Exception as e:
        import traceback

        traceback.print_exc()
        info = {"error": f"{type(e).__name__}: {e}"[:400]}
        _write_json(p["state"] / "setup.json", dict(info, attention={}, experts="?",
                                                     versions={}, device_name="?"))
    if info.get("error"):
        return 1
    state = p["state"]
    env = dict(os.environ, PYTHON=sys.executable)
    # --- throughput: a random Qwen2-1.5B-shaped model, converted, and packed data per length
    marker = state / "prep_throughput.json"
    if _read_json(marker) is None or _read_json(marker).get("status") != "ok":
        t = time.time()
        try:
            import torch

            from bench_train_gpu import QWEN2_1_5B, make_assets

            shape = TINY_QWEN2 if args.tiny else QWEN2_1_5B
            seqs = sorted({c["seq"] for c in _configs(args)
                           if _runnable(c["backend"], args.device) is None})
            data = {}
            ckpt = None
            torch.set_num_threads(max(1, min(8, (os.cpu_count() or 2) // 2)))
            for seq in seqs:
                ckpt, prefix = make_assets(p["throughput"], shape, seq,
                                           documents=120 if args.tiny else 1000)
                data[str(seq)] = prefix
            _write_json(marker, {"status": "ok", "ckpt": str(ckpt) if ckpt else None,
                                 "data": data, "seconds": round(time.time() - t, 1)})
            print(f"throughput inputs ready in {time.time() - t:.1f}s: {data}", flush=True)
        except Exception as e:
            import traceback

            traceback.print_exc()
            _write_json(marker, {"status": "failed", "error": f"{type(e).__name__}: {e}"[:400],
                                 "seconds": round(time.time() - t, 1)})
    # --- recipe: tokenizer, conversations, the R1-shaped model, convert, tokenize
    marker = state / "prep_recipe.json"
    t0 = time.time()
    timings: dict[str, float] = {}
    try:
        import torch
        from transformers import AutoTokenizer

        from bench_train_gpu import R1_DISTILL_QWEN_1_5B
        from megatron.sft.bridge.random_hf_model import make_random_hf_model
        from megatron.sft.data.tiny_tokenizer import save_tiny_tokenizer

        seq = 256 if args.tiny else 16384
        count = 40 if args.tiny else 300
        t = time.time()
        convs = synthetic_reasoning_conversations(count, seq)
        corpus = [m["content"] for c in convs[:100] for m in c["messages"]]
        tok_dir = save_tiny_tokenizer(p["tokenizer"], template="deepseek_r1", corpus=corpus,
                                      vocab_size=600 if args.tiny else 4096)
        tok = AutoTokenizer.from_pretrained(tok_dir)
        convs = _fit_conversations(convs, tok, int(seq * 0.9))
        p["data_file"].parent.mkdir(parents=True, exist_ok=True)
        with open(p["data_file"], "w") as f:
            for c in convs:
                f.write(json.dumps(c) + "\n")
        timings["tokenizer + conversations"] = round(time.time() - t, 1)
        t = time.time()
        base = dict(TINY_QWEN2) if args.tiny else dict(R1_DISTILL_QWEN_1_5B)
        base.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id)
        shutil.rmtree(p["hf"], ignore_errors=True)
        torch.set_num_threads(max(1, min(8, (os.cpu_count() or 2) // 2)))
        make_random_hf_model("Qwen2ForCausalLM", p["hf"], config=base, dtype=torch.bfloat16,
                             seed=21)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok_dir / name, p["hf"] / name)
        timings["random HF model"] = round(time.time() - t, 1)
        from megatron.sft.bridge.architectures import shape_of

        _, shape = shape_of(json.loads((p["hf"] / "config.json").read_text()))
        params = sum(v.numel() for v in _safetensors_shapes(p["hf"]))
        for name, cmd, sub_env in (
                ("convert_deepseek_r1_to_megatron.sh 1.5B 1 1",
                 ["bash", str(REPO / "scripts/checkpoints/convert_deepseek_r1_to_megatron.sh"),
                  "1.5B", "1", "1"], {"ASSETS_DIR": str(p["assets"]), "FORCE": "1"}),
                (f"tokenize_dataset.sh {seq}",
                 ["bash", str(REPO / "scripts/data/tokenize_dataset.sh"), str(p["hf"]),
                  str(p["data_file"]), str(seq), "1" if args.tiny else "8"],
                 {"FORCE": "1", "EXTRA_ARGS": "--no-progress"})):
            t = time.time()
            print(f"$ {shlex.join(cmd)}", flush=True)
            rc, output = run_script(cmd, dict(env, **sub_env), in_process=args.tiny)
            print(output, flush=True)
            timings[name] = round(time.time() - t, 1)
            if rc != 0:
                lines = [x for x in output.splitlines() if x.strip()]
                raise RuntimeError(f"{name} exited {rc}: {lines[-1] if lines else 'no output'}")
        stats = _read_json(Path(str(p["data_prefix"]) + "_stats.json")) or {}
        _write_json(marker, {
            "status": "ok", "seconds": round(time.time() - t0, 1), "timings": timings,
            "conversations": len(convs), "vocab": len(tok), "params": params,
            "layers": shape.num_layers, "hidden": shape.hidden_size,
            "checkpoint_gb": round(params * 14 / 1e9, 2),
            "samples": stats.get("samples_written"), "tokens": stats.get("tokens"),
            "loss_tokens": stats.get("loss_tokens"),
            "max_sample_tokens": stats.get("max_sample_tokens")})
        print(f"recipe inputs ready in {time.time() - t0:.1f}s: {timings}", flush=True)
    except Exception as e:
        import traceback

        traceback.print_exc()
        _write_json(marker, {"status": "failed", "error": f"{type(e).__name__}: {e}"[:400],
                             "seconds": round(time.time() - t0, 1), "timings": timings})
        return 0
    # Then wait to read the recipe's export back: this process has torch and transformers
    # imported already (seconds saved); the orchestrator asks with state/forward_request.json.
    request = _wait_for(state / "forward_request.json", args.deadline or time.time() + 3600)
    if request is None:
        return 0
    import contextlib

    with open(p["out"] / "recipe.log", "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        print("\n(export and transformers forward, in the background process that prepared "
              "the inputs)", flush=True)
        return hf_forward.export_and_forward(args)




def _safetensors_shapes(hf: Path):
    import torch
    from safetensors import safe_open

    for f in sorted(hf.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                yield torch.empty(st.get_slice(name).get_shape(), device="meta")
