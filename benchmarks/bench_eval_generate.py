#!/usr/bin/env python3
"""What ``--eval-generate`` costs, and whether a KV cache would pay off (CPU or one GPU).

On one rank, a random model of the given shape is built as training builds it; then:

- ours:      :class:`~megatron.sft.training.generation.GreedyGenerator` (what the trainer
             runs): one full forward of every active row per new token, no KV cache;
- hf cache:  ``transformers``' ``generate(do_sample=False)`` on the same shape, with its KV
             cache (each step runs one new token against the cached keys and values);
- hf full:   the same without the cache (``use_cache=False``), which is our algorithm;
- one evaluation of the run (``--eval-iters x --global-batch-size x --seq-length`` tokens)
  estimated from our forward throughput on one row of ``--seq-length`` tokens.

  python benchmarks/bench_eval_generate.py --shape demo
  python benchmarks/bench_eval_generate.py --shape /work/shared/assets/r1_distill_qwen_1.5b_config.json \
      --prompts 1 --prompt-tokens 32 --new-tokens 8 --seq-length 1024 --eval-iters 10 --global-batch-size 64

``demo`` is the quickstart's model (Qwen2-shaped, 4 layers, hidden 128, vocabulary 512) and
its evaluation (2 x 16 rows of 128 tokens). A config.json path gives any other shape (weights
random, initialised in place: nothing is written). ``--probe-inference-context`` checks whether
megatron-core's own KV cache (``StaticInferenceContext``) runs on our layers without TE.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEMO = dict(architectures=["Qwen2ForCausalLM"], vocab_size=512, hidden_size=128,
            intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            model_type="qwen2")


def _config(shape: str) -> dict:
    return dict(DEMO) if shape == "demo" else json.loads(Path(shape).read_text())


def _megatron(config: dict, dtype):
    import torch

    from megatron.sft.bridge.checkpoint_io import CheckpointMetadata
    from megatron.sft.bridge.architectures import shape_of
    from megatron.sft.model.builder import build_model
    from megatron.sft.model.layer_impl import resolve_layer_impl
    from megatron.sft.runtime.distributed import initialize_distributed
    from megatron.sft.runtime.layout import ParallelLayout
    from megatron.sft.runtime.parallel_dims import parallel_dims
    from megatron.sft.training.generation import GreedyGenerator

    info = initialize_distributed(ParallelLayout(), seed=0)
    vocab = config["vocab_size"]
    meta = CheckpointMetadata(architecture=config["architectures"][0], hf_config=config,
                              layout=ParallelLayout(), make_vocab_size_divisible_by=128,
                              padded_vocab_size=-(-vocab // 128) * 128,
                              params_dtype=str(dtype).replace("torch.", ""))
    impl = resolve_layer_impl("auto", "auto", info.device.type, dtype=dtype)
    chunks = build_model(meta, impl, params_dtype=dtype, perform_initialization=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.normal_(0.0, 0.02)
    _, shape = shape_of(config)
    return GreedyGenerator(chunks, shape, impl, parallel_dims(), chunks[0].config, info.device)


def _hf(config: dict, dtype, device):
    import torch
    import transformers

    cls = getattr(transformers, config["architectures"][0])
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.items()
                                               if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(cfg).to(dtype)
    return model.eval()


def probe_inference_context() -> dict:
    """Does megatron-core's ``StaticInferenceContext`` (its KV cache) run on our layers without
    Transformer Engine? Prefill 11 tokens, decode the 12th from the cache, compare its logits
    with a full forward of all 12, per attention backend (the demo's shape, one rank)."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron.sft.bridge.checkpoint_io import CheckpointMetadata
    from megatron.sft.model.builder import build_model
    from megatron.sft.model.layer_impl import LayerImpl
    from megatron.sft.runtime.distributed import initialize_distributed
    from megatron.sft.runtime.layout import ParallelLayout
    from megatron.sft.runtime.parallel_dims import set_parallel_dims

    out = {}
    for backend in ("dense", "sdpa"):
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
            set_parallel_dims(None)
        initialize_distributed(ParallelLayout(), seed=0)
        meta = CheckpointMetadata(architecture="Qwen2ForCausalLM", hf_config=dict(DEMO),
                                  layout=ParallelLayout(), make_vocab_size_divisible_by=128,
                                  padded_vocab_size=512, params_dtype="float32")
        model = build_model(meta, LayerImpl("local", backend), params_dtype=torch.float32,
                            parallel_output=False)[0].eval()
        tokens = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(12).unsqueeze(0)
        try:
            with torch.no_grad():
                full = model(tokens, positions, attention_mask=None)
                ctx = StaticInferenceContext(1, 64)
                model(tokens[:, :11], positions[:, :11], attention_mask=None,
                      inference_context=ctx, runtime_gather_output=True)
                ctx.sequence_len_offset += 11
                step = model(tokens[:, 11:], positions[:, 11:], attention_mask=None,
                             inference_context=ctx, runtime_gather_output=True)
            out[backend] = {"works": True,
                            "max_abs_diff_vs_full": (step[0, -1] - full[0, -1]).abs().max().item()}
        except Exception as exc:  # what fails, for the record
            out[backend] = {"works": False, "error": f"{type(exc).__name__}: {exc}"[:200]}
    return out


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="demo", help="'demo' or a config.json path")
    p.add_argument("--prompts", type=int, default=2, help="prompts per generation (N)")
    p.add_argument("--prompt-tokens", type=int, default=24, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=16, help="new tokens per prompt")
    p.add_argument("--seq-length", type=int, default=128, help="the run's --seq-length")
    p.add_argument("--eval-iters", type=int, default=2, help="the run's --eval-iters")
    p.add_argument("--global-batch-size", type=int, default=16, help="the run's GBS")
    p.add_argument("--bf16", action="store_true", help="bf16 weights (default fp32)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats (the best is kept)")
    p.add_argument("--skip-hf", action="store_true", help="only our generator")
    p.add_argument("--probe-inference-context", action="store_true",
                   help="only check whether megatron-core's StaticInferenceContext (KV cache) "
                        "runs on our local layers, per attention backend")
    args = p.parse_args()
    if args.probe_inference_context:
        print(json.dumps(probe_inference_context(), indent=1))
        return 0

    import torch

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = _config(args.shape)
    n, prompt_len, new = args.prompts, args.prompt_tokens, args.new_tokens
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, config["vocab_size"], (n, prompt_len), generator=g).tolist()
    out = {"shape": args.shape, "dtype": str(dtype), "prompts": n, "prompt_tokens": prompt_len,
           "new_tokens": new, "threads": torch.get_num_threads()}

    gen = _megatron(config, dtype)
    device = gen.device
    seconds = _timed(lambda: gen.generate(prompts, new), args.repeats)
    forwarded = n * sum(prompt_len + t for t in range(new))
    out["ours_s"] = seconds
    out["ours_new_tokens_per_s"] = n * new / seconds
    out["ours_forwarded_tokens_per_s"] = forwarded / seconds
    row = torch.randint(0, config["vocab_size"], (1, args.seq_length), generator=g).tolist()
    forward_s = _timed(lambda: gen.next_tokens(row), args.repeats)  # one full row's forward
    eval_tokens = args.eval_iters * args.global_batch_size * args.seq_length
    out["eval_estimate_s"] = eval_tokens / (args.seq_length / forward_s)
    out["generation_over_eval"] = seconds / out["eval_estimate_s"]
    del gen
    import gc

    gc.collect()
    if not args.skip_hf:
        model = _hf(config, dtype, device)
        ids = torch.tensor(prompts, device=device)
        for name, cache in (("hf_cache", True), ("hf_full", False)):
            s = _timed(lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new,
                                              do_sample=False, use_cache=cache, pad_token_id=0),
                       args.repeats)
            out[f"{name}_s"] = s
            out[f"{name}_new_tokens_per_s"] = n * new / s
        out["kv_cache_speedup"] = out["hf_full_s"] / out["hf_cache_s"]
    print(json.dumps(out, indent=1))
    from megatron.sft.runtime.distributed import destroy_distributed

    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
