"""The preview's highlighting is the loss mask, shown: checked on real chat-template renders.

References: the renderer's mask (whose own tests check it against HF's ``apply_chat_template``)
and the tokenizer's whole-sequence decode. Every ``[[...]]`` span must decode to exactly one run
of mask-1 tokens, and for ChatML the highlighted text must be the assistant contents, each with
its ``<|im_end|>``.
"""

import re

import numpy as np
import pytest

from megatron.sft.data.inspect import (
    ANSI_LEARNED,
    ANSI_RESET,
    Segment,
    histograms,
    learned_per_sample,
    marked_spans,
    mask_runs,
    pick_indices,
    render_segments,
    reservoir_sample,
    sample_counts,
    segments,
    token_pieces,
    use_color,
)
from megatron.sft.data.inspect_io import PreviewSample, decode_pieces, format_sample
from megatron.sft.data.render import ConversationRenderer, RenderConfig

EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "deepseek_r1": "<｜end▁of▁sentence｜>"}

RECORD = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 3? é 你好"},
    {"role": "assistant", "content": "It is 5 <short> indeed, 🙂."},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "<think>Easy.</think>Paris."},
]}
ASSISTANT = [m["content"] for m in RECORD["messages"] if m["role"] == "assistant"]
ANSI = re.compile("\x1b\\[[0-9;]*m")


def rendered(tokenizer, **config):
    [sample] = ConversationRenderer(tokenizer, RenderConfig(**config)).render_batch([RECORD])
    return sample


@pytest.mark.parametrize("template", ["chatml", "llama3", "deepseek_r1"])
def test_marked_spans_are_exactly_the_learned_token_runs(tokenizers, template):
    tok = tokenizers[template]
    sample = rendered(tok)
    pieces = decode_pieces(tok.backend_tokenizer, sample.ids)
    assert "".join(pieces) == tok.decode(sample.ids.tolist())  # token by token == whole decode
    text = render_segments(segments(pieces, sample.mask), color=False)
    runs = mask_runs(sample.mask)
    assert marked_spans(text) == [tok.decode(sample.ids[a:b].tolist()) for a, b in runs]
    assert sum(b - a for a, b in runs) == int(sample.mask.sum())
    # removing the markers gives back the sample's text, nothing added or lost
    assert text.replace("[[", "").replace("]]", "") == tok.decode(sample.ids.tolist())
    if template == "deepseek_r1":  # the template drops earlier turns' <think>; this one is last
        assert marked_spans(text)[-1] == "<think>Easy.</think>Paris." + EOT[template]


def test_chatml_highlight_is_the_assistant_turns_and_their_end_of_turn(tokenizers):
    sample = rendered(tokenizers["chatml"])
    pieces = decode_pieces(tokenizers["chatml"].backend_tokenizer, sample.ids)
    text = render_segments(segments(pieces, sample.mask), color=False)
    assert marked_spans(text) == [c + "<|im_end|>" for c in ASSISTANT]
    assert sample_counts(sample.mask).learned_turns == 2
    last = rendered(tokenizers["chatml"], loss_on="last-assistant")
    last_text = render_segments(segments(decode_pieces(tokenizers["chatml"].backend_tokenizer,
                                                       last.ids), last.mask), color=False)
    assert marked_spans(last_text) == [ASSISTANT[-1] + "<|im_end|>"]


def test_colour_wraps_the_same_spans_line_by_line(tokenizers):
    tok = tokenizers["chatml"]
    sample = rendered(tok)
    preview = PreviewSample("record 0 (x.jsonl:1)", sample.ids, sample.mask)
    plain = format_sample(preview, tok.backend_tokenizer, color=False)
    coloured = format_sample(preview, tok.backend_tokenizer, color=True)
    counts = sample_counts(sample.mask)
    assert plain.splitlines()[0] == f"=== record 0 (x.jsonl:1): {counts.describe()} ==="
    assert ANSI.sub("", coloured) == plain.replace("[[", "").replace("]]", "")
    learned = re.findall(re.escape(ANSI_LEARNED) + "(.*?)" + re.escape(ANSI_RESET), coloured)
    assert learned == [c + "<|im_end|>" for c in ASSISTANT]
    assert render_segments([Segment("a\nb", True)], color=True) == (
        f"{ANSI_LEARNED}a{ANSI_RESET}\n{ANSI_LEARNED}b{ANSI_RESET}")


def test_pieces_segments_and_counts_worked_example():
    pieces = ["<|im_start|>", "user", "\n", "Hi", "<|im_end|>", "\n", "<|im_start|>", "assistant",
              "\n", "Hello", "<|im_end|>", "\n"]
    mask = [0] * 9 + [1, 1, 0]
    assert mask_runs(mask) == [(9, 11)]
    assert mask_runs([1, 1, 0, 1]) == [(0, 2), (3, 4)] and mask_runs([]) == []
    text = render_segments(segments(pieces, mask), color=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello<|im_end|>]]\n"
    assert sample_counts(mask).describe() == "12 tokens, 2 learned (16.7%), 1 learned turn"
    # a character split over byte tokens belongs to the token that completes it
    stream = iter([None, "é", "x"])
    assert token_pieces([7, 8, 9], lambda i: next(stream)) == ["", "é", "x"]
    with pytest.raises(ValueError, match="must align"):
        segments(["a"], [1, 0])


def test_index_choice_errors_name_the_range():
    assert pick_indices(10) == [0, 1, 2] and pick_indices(2) == [0, 1]
    assert pick_indices(10, index=[7, 2]) == [7, 2]
    with pytest.raises(ValueError, match=r"--index 10 -1 is out of range: there are 10 samples \(0..9\)"):
        pick_indices(10, index=[10, 3, -1])
    one = pick_indices(400, random_n=5, seed=3)
    assert one == pick_indices(400, random_n=5, seed=3) == sorted(one) and len(set(one)) == 5
    assert pick_indices(4, random_n=9) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="not both"):
        pick_indices(10, index=[1], random_n=2)
    picked, count = reservoir_sample("abcdef", 3, seed=1)
    assert count == 6 and picked == reservoir_sample("abcdef", 3, seed=1)[0]
    assert [i for i, _ in picked] == sorted(i for i, _ in picked)
    assert all("abcdef"[i] == x for i, x in picked)


def test_colour_choice():
    assert use_color("auto", True, {"TERM": "xterm"})
    assert not use_color("auto", True, {"TERM": "xterm", "NO_COLOR": ""})
    assert not use_color("auto", True, {"TERM": "dumb"}) and not use_color("auto", False, {})
    assert use_color("always", False, {}) and not use_color("never", True, {})


def test_histogram_data():
    assert learned_per_sample(np.array([0, 1, 1, 0, 1], np.uint8), np.array([3, 2])).tolist() == [2, 1]
    assert learned_per_sample(np.array([1, 1], np.uint8), np.array([1, 0, 1])).tolist() == [1, 0, 1]
    h = histograms(np.array([10, 30, 30]), np.array([5, 3, 3]), seq_length=20, length_bins=10)
    assert h.over == 2 and h.samples == 3 and h.max_length == 30
    assert h.length_counts.sum() == 3 and h.length_edges[-1] > 30  # 30 itself is in a bin
    assert h.share_counts.sum() == 3 and h.median_share == pytest.approx(0.1)
    assert np.diff(h.length_edges).tolist() == [3] * (len(h.length_edges) - 1)  # whole tokens
    assert "MAX_LEN 20: 2 longer" in h.summary()
    assert "MAX_LEN unknown" in histograms(np.array([4]), np.array([1])).summary()
    with pytest.raises(ValueError, match="no samples"):
        histograms(np.array([], np.int64), np.array([], np.int64))
