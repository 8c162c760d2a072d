"""Model FLOPs per token against torch's own FLOP counter on the transformers model."""

import torch

from megatron.sft.bridge.architectures import get_architecture
from megatron.sft.bridge.random_hf_model import TINY_CONFIGS
from megatron.sft.training.metrics import peak_tflops, training_flops, training_flops_per_token


def test_flops_per_token_match_torch_flop_counter():
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    cfg = transformers.Qwen2Config(architectures=["Qwen2ForCausalLM"],
                                   **TINY_CONFIGS["Qwen2ForCausalLM"])
    cfg._attn_implementation = "eager"
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    shape = get_architecture("Qwen2ForCausalLM").shape(cfg.to_dict())
    seq = 32
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, seq, dtype=torch.long))
    counted_per_token = counter.get_total_flops() / seq
    # The counter charges full (non-causal) attention: 4*s*q per layer per token; ours charges
    # the causal half, 2*s*q. Everything else (every matmul, the LM head) must agree exactly.
    ours_forward = training_flops_per_token(shape, seq) / 3
    causal_half = 2 * seq * shape.dim("q") * shape.num_layers
    assert ours_forward + causal_half == counted_per_token


def test_packed_documents_are_charged_per_document():
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    cfg = transformers.Qwen2Config(architectures=["Qwen2ForCausalLM"],
                                   **TINY_CONFIGS["Qwen2ForCausalLM"])
    cfg._attn_implementation = "eager"
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    shape = get_architecture("Qwen2ForCausalLM").shape(cfg.to_dict())
    lengths = [20, 7, 1, 4]
    counted = 0
    with torch.no_grad():
        for n in lengths:  # each document on its own: what packed attention really computes
            with FlopCounterMode(display=False) as counter:
                model(torch.zeros(1, n, dtype=torch.long))
            full_attention = 4 * n * n * shape.dim("q") * shape.num_layers
            counted += counter.get_total_flops() - full_attention / 2  # causal half
    assert training_flops(shape, lengths) == 3 * counted
    # One row of 32 filled by these documents costs less than one 32-token document.
    assert training_flops(shape, lengths) < training_flops_per_token(shape, 32) * 32


def test_peak_lookup():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("Some GPU") is None and peak_tflops("Some GPU", 100.0) == 100.0
