"""The fast pre-tokenisation path gives exactly what the straightforward one gives.

The fast path reads token offsets lazily from the ``tokenizers.Encoding`` and hands whole chunks
to the writer and the stats; the reference below is the original per-sample code (offsets as an
array, ``np.searchsorted``, a vectorised end-of-turn table), kept here as the specification.
"""

import random
from itertools import chain

import numpy as np
import pytest

from megatron.sft.data.formats import RecordError
from megatron.sft.data.loss_mask import ArrayOffsets, EncodingOffsets, build_ids_and_mask, learn_ranges
from megatron.sft.data.render import ConversationRenderer, RenderConfig
from megatron.sft.data.stats import PreprocessStats

TEXTS = [
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there<|im_end|>\n",
    "é ü 你好 🙂 x  trailing  \n\n",
    "",
    "<short><short> a<short>b",
]


def records():
    rng = random.Random(0)
    words = "the cat sat <short> on 🙂 mat 你好 é assistant user <think> </think> 42 \n".split(" ")
    out = []
    for i in range(60):
        turns = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for _ in range(1 + i % 3):
            turns.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 12)))})
            answer = " ".join(rng.choices(words, k=rng.randint(1, 40)))
            if i % 4 == 0:
                answer = "<think>" + answer + "</think>" + answer
            turns.append({"role": "assistant", "content": answer if answer.strip() else "ok"})
        out.append({"messages": turns})
    out.append({"instruction": "Add", "input": "2 and 3", "output": "5"})
    out.append({"messages": [{"role": "user", "content": "x"}]})  # no assistant: an error
    return out


def reference_sample(renderer, record):
    """The original per-sample implementation (array offsets + searchsorted), for comparison."""
    try:
        rendered = renderer.render_text(record)
        spans = renderer._learn_spans(rendered)
    except RecordError as err:
        return err
    enc = renderer.backend.encode_batch([rendered.text], add_special_tokens=False)[0]
    ids = np.asarray(enc.ids, dtype=np.int64)
    offsets = np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)
    eot_ok = None
    if not rendered.eot_in_spans:
        is_special = np.zeros(max(int(ids.max(initial=0)) + 1, max(renderer.special_ids, default=0) + 1), bool)
        is_special[list(renderer.special_ids)] = True
        eot_ok = is_special[ids]
        if renderer.bos_id is not None:
            eot_ok &= ids != renderer.bos_id
        ends = offsets[:, 1]
        for span in rendered.message_spans:
            if span is None:
                continue
            j = int(ends.searchsorted(span[0], side="right")) - 1
            if j >= 0 and ends[j] == span[0] and eot_ok[j]:
                eot_ok &= ids != ids[j]
    ids32, mask = build_ids_and_mask(ids, offsets, spans, eot_ok)
    limit, truncated = renderer.config.max_length, False
    if limit is not None and len(ids32) > limit:
        if not renderer.config.truncate:
            return RecordError("too_long", "")
        ids32, mask, truncated = ids32[:limit], mask[:limit], True
    if not mask.any():
        return RecordError("no_loss_tokens", "")
    return ids32, mask, truncated


@pytest.mark.parametrize("template", ["chatml", "llama3", "deepseek_r1"])
def test_encoding_offsets_answer_like_searchsorted(tokenizers, template):
    backend = tokenizers[template].backend_tokenizer
    for enc in backend.encode_batch(TEXTS, add_special_tokens=False):
        lazy = EncodingOffsets(enc, len(enc.ids))
        array = ArrayOffsets(np.array(enc.offsets, dtype=np.int64).reshape(-1, 2))
        assert len(lazy) == len(array)
        for j in range(len(lazy)):
            assert (lazy.start(j), lazy.end(j)) == (array.start(j), array.end(j))
        for x in range(-1, max(array.ends, default=0) + 3):
            assert lazy.ends_right(x) == array.ends_right(x)
            assert lazy.starts_left(x) == array.starts_left(x)


class _FakeEncoding:
    def __init__(self, pairs):
        self.pairs = pairs

    def token_to_chars(self, j):
        return self.pairs[j]


def test_lazy_bisection_matches_numpy_even_on_unsorted_offsets():
    rng = random.Random(1)
    for n in range(0, 40):
        pairs = [(rng.randint(0, 30), rng.randint(0, 30)) for _ in range(n)]
        lazy, array = EncodingOffsets(_FakeEncoding(pairs), n), ArrayOffsets(np.array(pairs, np.int64).reshape(-1, 2))
        for x in range(-2, 33):
            assert lazy.ends_right(x) == array.ends_right(x) and lazy.starts_left(x) == array.starts_left(x)


def test_learn_ranges_docstring_example():
    offsets = ArrayOffsets(np.array([[0, 3], [3, 5], [5, 9], [9, 19]]))
    assert learn_ranges(offsets, [(3, 9)], eot_ok=lambda j: j == 3) == [(1, 4)]
    assert learn_ranges(offsets, [(3, 9)], eot_ok=lambda j: False) == [(1, 3)]


@pytest.mark.parametrize("template", ["chatml", "llama3", "deepseek_r1"])
@pytest.mark.parametrize("render", [
    dict(), dict(prompt_style="chatml"), dict(prompt_style="alpaca"), dict(loss_on="last-assistant"),
    dict(loss_on="all"), dict(max_length=24), dict(max_length=24, truncate=True), dict(max_length=3, truncate=True),
])
def test_fast_path_equals_reference_and_chunk_equals_samples(tokenizers, template, render):
    renderer = ConversationRenderer(tokenizers[template], RenderConfig(**render))
    batch = records()
    samples = renderer.render_batch(batch)
    for record, got in zip(batch, samples):
        want = reference_sample(renderer, record)
        if isinstance(want, RecordError):
            assert isinstance(got, RecordError) and got.reason == want.reason
        else:
            assert got.ids.dtype == np.int32 and got.mask.dtype == np.uint8
            assert (got.ids.tolist(), got.mask.tolist(), got.truncated) == (
                want[0].tolist(), want[1].tolist(), want[2])
    chunk = renderer.tokenize_chunk(batch)
    kept = [s for s in samples if not isinstance(s, RecordError)]
    assert [(i, r) for i, r, _ in chunk.errors] == [
        (i, s.reason) for i, s in enumerate(samples) if isinstance(s, RecordError)]
    assert chunk.lengths.tolist() == [len(s.ids) for s in kept]
    assert chunk.ids.tolist() == list(chain.from_iterable(s.ids.tolist() for s in kept))
    assert chunk.mask.tolist() == list(chain.from_iterable(s.mask.tolist() for s in kept))
    assert chunk.loss_tokens.tolist() == [int(s.mask.sum()) for s in kept]
    assert chunk.truncated == sum(s.truncated for s in kept)


def test_stats_add_samples_equals_add_sample_one_by_one():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([[1, 2, 3, 4, 5, 255, 256, 257, 4096, 4097], rng.integers(1, 70000, 500)])
    loss = rng.integers(0, 50, len(lengths))
    one, many = PreprocessStats(), PreprocessStats()
    for n, m in zip(lengths.tolist(), loss.tolist()):
        one.add_sample(n, m, truncated=n % 7 == 0)
    many.add_samples(lengths[:300], loss[:300], int((lengths[:300] % 7 == 0).sum()))
    many.add_samples(lengths[300:], loss[300:], int((lengths[300:] % 7 == 0).sum()))
    many.add_samples(lengths[:0], loss[:0], 0)
    assert one.to_dict() == many.to_dict()
