"""Exact-match accuracy of a HuggingFace model on held-out prompts, by greedy generation with
the tokenizer's chat template (what a user of the exported model would run)."""

from __future__ import annotations

from pathlib import Path

from megatron.sft.quickstart.task import is_correct


def generation_accuracy(model_dir: "str | Path", tokenizer_dir: "str | Path",
                        heldout: list[tuple[str, str]], max_new_tokens: int = 24
                        ) -> tuple[float, list[tuple[str, str, str]]]:
    """Returns ``(accuracy, examples)`` with examples ``(prompt, expected, generated)``.

    Generates on one CPU thread: a tiny model's ops are too small to gain from more, and with
    more they wait on each other (transformers' MoE experts are many tiny GEMMs; on a busy
    2-core machine its forward took 6x longer on 2 threads than on 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _generation_accuracy(model_dir, tokenizer_dir, heldout, max_new_tokens)
    finally:
        torch.set_num_threads(threads)


def _generation_accuracy(model_dir, tokenizer_dir, heldout, max_new_tokens):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    correct, examples = 0, []
    with torch.no_grad():
        for prompt, expected in heldout:
            inputs = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id or eos)
            text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += is_correct(text, expected)
            examples.append((prompt, expected, text.strip()))
    return correct / max(len(heldout), 1), examples
