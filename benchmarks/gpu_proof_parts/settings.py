"""Steps, budgets, the throughput configurations and the tiny shapes of the GPU proof."""

from __future__ import annotations

from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
#: the entry script: every child step runs it with --run-step
ENTRY = BENCH / "gpu_proof.py"

#: (key, title, budget in seconds); the total is the default --budget
STEPS = (("setup", "setup", 30), ("gpu_tests", "gpu tests", 100),
         ("throughput", "throughput", 145), ("recipe", "recipe", 125), ("moe", "moe", 55),
         ("kernels", "kernels", 25))
TOTAL_BUDGET = sum(b for _, _, b in STEPS)

#: throughput configurations (full-size sequence length, attention backend, recompute), in the
#: order they run
CONFIGS = ((4096, "varlen", "none"), (16384, "varlen", "selective"), (4096, "sdpa", "none"),
           (4096, "flex", "none"), (16384, "flex", "selective"))
GLOBAL_BATCH = {4096: 8, 16384: 2}
TINY_SEQ = {4096: 256, 16384: 512}
TINY_GLOBAL_BATCH = {256: 2, 512: 1}

#: the tiny model of --tiny, for the throughput runs and (with the tokenizer's vocabulary)
#: the recipe
TINY_QWEN2 = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0)

#: the names the recipe scripts expect (their defaults: nothing to override but ASSETS_DIR)
R1_HF_NAME = "deepseek_ai_DeepSeek_R1_Distill_Qwen_1.5B"
R1_DATASET = "Vinnnf-Hybrid-OpenThoughts2-1M-1.5B"
R1_SAVE_NAME = "SFT_Hybrid_R1_1.5B"
