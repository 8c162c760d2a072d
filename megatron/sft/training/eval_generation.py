"""``--eval-generate N``: at every evaluation the model greedily continues N held-out prompts, so a
run shows what it now answers (does it open ``<think>``, stop at the end of its turn, follow the
format?), not only its validation loss.

The prompts are built once, at start (a bad ``--eval-prompts`` file or a missing tokenizer fails
before training): the first N validation samples cut before their first assistant turn, or the
records of ``--eval-prompts FILE`` (:mod:`megatron.sft.data.eval_prompts`). Each evaluation
decodes up to ``--eval-generate-tokens`` new tokens per prompt, stopping at the chat template's
end-of-turn token or EOS (:mod:`megatron.sft.training.generation`), and adds to the iteration's
record ``generations`` (prompt, completion, reference, token counts: the JSON log),
``generate_s`` and ``generate_tokens_per_s``; the run log prints them and writes them to
TensorBoard as a text summary per step.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from megatron.sft.data.eval_prompts import (
    EvalPrompt,
    prompts_from_file,
    prompts_from_samples,
    renderer_for,
    stop_token_ids,
)
from megatron.sft.data.validation import read_stats

#: validation samples looked at per prompt wanted (samples learned from their first token have
#: no prompt and are skipped)
_SCAN = 8
#: characters of a prompt the console shows (its end: the last user turn and the header)
_CONSOLE_PROMPT_CHARS = 160


def load_eval_tokenizer(cfg, data_prefix: str):
    """``--tokenizer-model``, else the tokenizer the data's ``_stats.json`` records."""
    from megatron.sft.data.preprocess import PreprocessError, load_tokenizer

    path = cfg.tokenizer_model or (read_stats(data_prefix) or {}).get("tokenizer")
    if not path:
        raise ValueError(f"--eval-generate {cfg.eval_generate} needs the tokenizer to decode "
                         f"with, and {data_prefix}_stats.json records none; pass "
                         "--tokenizer-model DIR (the HF folder the data was tokenized with)")
    try:
        return load_tokenizer(path)
    except PreprocessError as exc:
        flag = "--tokenizer-model" if cfg.tokenizer_model else f"{data_prefix}_stats.json's tokenizer"
        raise ValueError(f"--eval-generate: {flag}: {exc}") from None


def validation_prompts(valid_ds, count: int) -> list[EvalPrompt]:
    """The first ``count`` validation samples that have a prompt, cut before their answer."""
    if valid_ds is None:
        raise ValueError("--eval-generate without --eval-prompts takes its prompts from the "
                         "validation split, and this run has none; give --split with a "
                         "validation weight (e.g. 98,2,0), --valid-data-path, or "
                         "--eval-prompts FILE")
    if valid_ds.pretraining:
        raise ValueError("--eval-generate: the validation data has no loss mask (pretraining "
                         "data), so no sample has an assistant turn to cut before; give "
                         "--eval-prompts FILE")
    docs = [int(d) for d in valid_ds.indices[:count * _SCAN]]
    samples = [(valid_ds.text[d], valid_ds.mask[d], f"valid sample {i} (document {d})")
               for i, d in enumerate(docs)]
    prompts = prompts_from_samples(samples)[:count]
    if not prompts:
        raise ValueError("--eval-generate: no validation sample has an unlearned prompt before "
                         "its first learned token (data tokenized with --loss-on all?); give "
                         "--eval-prompts FILE")
    return prompts


class EvalGeneration:
    """Built at start by :func:`build_eval_generation`; the trainer attaches the generator once
    the model exists and calls it at each evaluation (a collective, on every rank)."""

    prompts: list[EvalPrompt]
    stop_ids: tuple[int, ...]
    max_new_tokens: int
    tokenizer: Any
    generator: Any = None               # GreedyGenerator, set by attach()

    def __init__(self, prompts, stop_ids, max_new_tokens, tokenizer):
        self.prompts, self.stop_ids = prompts, stop_ids
        self.max_new_tokens, self.tokenizer = max_new_tokens, tokenizer

    def attach(self, generator) -> None:
        self.generator = generator

    def describe(self) -> str:
        stops = ", ".join(repr(self.tokenizer.convert_ids_to_tokens(t)) for t in self.stop_ids)
        return (f"eval generations: {len(self.prompts)} prompt(s), up to {self.max_new_tokens} "
                f"new tokens, greedy, stopping at {stops or 'the token limit only'}")

    def __call__(self, iteration: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        state = self.generator.generate([p.ids for p in self.prompts], self.max_new_tokens,
                                        self.stop_ids)
        seconds = time.perf_counter() - t0
        decode = lambda ids: self.tokenizer.decode(list(ids), skip_special_tokens=False)  # noqa: E731
        out = []
        for p, new, stopped in zip(self.prompts, state.generated, state.stopped):
            out.append({"source": p.source, "prompt": decode(p.ids), "completion": decode(new),
                        "reference": decode(p.reference) if p.reference else None,
                        "prompt_tokens": len(p.ids), "new_tokens": len(new),
                        "stopped": stopped, "token_ids": new})
        total = sum(len(g) for g in state.generated)
        return {"generations": out, "generate_s": seconds,
                "generate_tokens_per_s": total / seconds if seconds > 0 else 0.0}


def build_eval_generation(cfg, train_ds, valid_ds, log: Callable[[str], None]
                          ) -> Optional[EvalGeneration]:
    """``None`` without ``--eval-generate``; else the prompts, stop tokens and tokenizer, or a
    ``ValueError`` naming the flag and the fix."""
    if not cfg.eval_generate:
        return None
    tokenizer = load_eval_tokenizer(cfg, train_ds.prefix)
    try:
        renderer = renderer_for(tokenizer)
    except ValueError as exc:
        if cfg.eval_prompts:
            raise ValueError(f"--eval-prompts {cfg.eval_prompts}: {exc}") from None
        renderer = None  # validation prompts need no template; stop at EOS only
    if cfg.eval_prompts:
        prompts = prompts_from_file(cfg.eval_prompts, renderer, cfg.eval_generate)
    else:
        prompts = validation_prompts(valid_ds, cfg.eval_generate)
    stops = stop_token_ids(renderer) if renderer is not None else tuple(
        t for t in (tokenizer.eos_token_id,) if t is not None)
    generation = EvalGeneration(prompts, stops, cfg.eval_generate_tokens, tokenizer)
    log(generation.describe())
    return generation


# ------------------------------------------------------------------------------ reports
def _shown(text: str, limit: int) -> str:
    """``repr`` of ``text``'s last ``limit`` characters (newlines visible), ``...`` if cut."""
    return ("..." if len(text) > limit else "") + repr(text[-limit:])


def console_lines(generations: list[dict], iteration: int) -> list[str]:
    """What the console shows of one evaluation's generations, two lines each::

        generate @ 20 [valid sample 0 (document 3)] ...'user\\nWhat is 3 plus 4?<|im_end|>...'
          -> '3 plus 4 is 7.<|im_end|>' (9 tokens, end of turn; reference '3 plus 4 is 7.<|im_end|>')
    """
    lines = []
    for g in generations:
        end = "end of turn" if g["stopped"] else "token limit"
        reference = f"; reference {g['reference']!r}" if g.get("reference") else ""
        lines.append(f"generate @ {iteration} [{g['source']}] "
                     f"{_shown(g['prompt'], _CONSOLE_PROMPT_CHARS)}")
        lines.append(f"  -> {g['completion']!r} ({g['new_tokens']} tokens, {end}{reference})")
    return lines


def text_summary(generations: list[dict]) -> str:
    """Markdown for TensorBoard's text tab: per prompt its source, the prompt's end, the answer
    and the reference, as code blocks (indented by four spaces) so templates show verbatim."""
    def block(text: str) -> str:
        return "\n".join("    " + line for line in text.splitlines() or [""])

    parts = []
    for g in generations:
        end = "end of turn" if g["stopped"] else "token limit"
        parts.append(f"**{g['source']}**, prompt (last 500 characters):\n\n"
                     f"{block(g['prompt'][-500:])}\n\n"
                     f"answer ({g['new_tokens']} tokens, {end}):\n\n{block(g['completion'])}")
        if g.get("reference"):
            parts[-1] += f"\n\nreference:\n\n{block(g['reference'])}"
    return "\n\n---\n\n".join(parts)
