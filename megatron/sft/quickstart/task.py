"""A synthetic SFT task whose answers can be checked exactly (pure).

"Repeat: tiger piano lemon" -> "tiger piano lemon". Conversations have one or two such turns;
held-out prompts are word sequences that never occur in the training set, so exact-match
accuracy on them measures learning, not lookup. An untrained model scores ~0.

The LoRA demo adapts the fine-tuned model to a second task over the same words, "Next: tiger
piano" -> "rocket lemon" (each word replaced by the one after it in ``WORDS``): the model's
copying stays useful, the word map is new, and a model that only repeats scores 0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = tuple("apple river stone cloud tiger piano lemon rocket forest candle mirror garden "
              "silver ocean pencil dragon window castle button meadow".split())
PROMPT = "Repeat: "
#: task kind -> (prompt prefix, how an answer word follows from a prompt word)
KINDS = {
    "repeat": (PROMPT, lambda w: w),
    "next": ("Next: ", lambda w: WORDS[(WORDS.index(w) + 1) % len(WORDS)]),
}


@dataclass(frozen=True)
class TaskConfig:
    kind: str = "repeat"
    train_conversations: int = 6000
    heldout_prompts: int = 100
    min_words: int = 2
    max_words: int = 5
    seed: int = 0


def _sequence(rng: random.Random, cfg: TaskConfig) -> tuple[str, ...]:
    return tuple(rng.choice(WORDS) for _ in range(rng.randint(cfg.min_words, cfg.max_words)))


def make_task(cfg: TaskConfig) -> tuple[list[dict], list[tuple[str, str]]]:
    """``(train_records, heldout)``: records in the OpenAI ``messages`` format; held-out items
    are ``(prompt, expected_answer)`` pairs whose word sequence is absent from training.

    >>> make_task(TaskConfig(kind="next", train_conversations=1, heldout_prompts=1))[1]
    [('Next: button stone forest', 'meadow cloud candle')]
    """
    if cfg.kind not in KINDS:
        raise ValueError(f"task kind {cfg.kind!r} is unknown; choose one of {sorted(KINDS)}")
    prompt, answer = KINDS[cfg.kind]
    rng = random.Random(cfg.seed)
    seen: set[tuple[str, ...]] = set()
    records = []
    for _ in range(cfg.train_conversations):
        messages = []
        for _turn in range(rng.randint(1, 2)):
            words = _sequence(rng, cfg)
            seen.add(words)
            messages += [{"role": "user", "content": prompt + " ".join(words)},
                         {"role": "assistant", "content": " ".join(map(answer, words))}]
        records.append({"messages": messages})
    heldout: list[tuple[str, str]] = []
    heldout_rng = random.Random(cfg.seed + 1)
    chosen: set[tuple[str, ...]] = set()
    while len(heldout) < cfg.heldout_prompts:
        words = _sequence(heldout_rng, cfg)
        if words in seen or words in chosen:
            continue
        chosen.add(words)
        heldout.append((prompt + " ".join(words), " ".join(map(answer, words))))
    return records, heldout


def tokenizer_corpus() -> list[str]:
    """Text the demo's BPE tokenizer is trained on: every task word is one token, with and
    without its leading space (an answer's first word follows the template's newline), and so
    are the template's role names and the prompt prefixes. A conversation is then ~30 tokens
    instead of ~48, and copying is a token-level task: the demo learns it in fewer steps."""
    prefixes = [p for p, _ in KINDS.values()]
    return ([" ".join(WORDS)] * 20 + list(WORDS) * 20 + [p + " ".join(WORDS) for p in prefixes] * 5
            + ["user\n", "assistant\n"] * 20)


def is_correct(generated: str, expected: str) -> bool:
    return generated.strip() == expected
