"""Rendering + loss masks, checked against independent references.

References: HF's own ``apply_chat_template(tokenize=True)`` for the ids, and the original assistant
strings for the mask (decoded masked tokens must spell exactly the assistant contents + their
end-of-turn markers, and every assistant character must be covered).
"""

import numpy as np
import pytest

from megatron.sft.data.chat_template import content_candidates, locate_messages
from megatron.sft.data.formats import RecordError
from megatron.sft.data.prompt_styles import render_alpaca, render_chatml
from megatron.sft.data.formats import Message
from megatron.sft.data.render import ConversationRenderer, RenderConfig, build_ids_and_mask

EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "deepseek_r1": "<｜end▁of▁sentence｜>"}

MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "It is 5 <short> indeed."},
        {"role": "user", "content": "And the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}


def masked_runs(tokenizer, ids, mask):
    """Decoded text of each maximal run of mask == 1."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(tokenizer.decode(ids[start:i]))
            start = None
    return runs


def render_one(tokenizer, record, **kw):
    [out] = ConversationRenderer(tokenizer, RenderConfig(**kw)).render_batch([record])
    return out


@pytest.mark.parametrize("template", ["chatml", "llama3", "deepseek_r1"])
def test_chat_template_ids_match_hf_and_mask_spells_assistant_turns(tokenizers, template):
    tok = tokenizers[template]
    sample = render_one(tok, MULTI_TURN)
    reference_ids = tok.apply_chat_template(MULTI_TURN["messages"], tokenize=True, return_dict=False)
    assert sample.ids.tolist() == list(reference_ids)
    assert sample.ids.dtype == np.int32 and sample.mask.dtype == np.uint8
    assert masked_runs(tok, sample.ids, sample.mask) == [
        "It is 5 <short> indeed." + EOT[template],
        "Paris." + EOT[template],
    ]


@pytest.mark.parametrize("template", ["chatml", "llama3", "deepseek_r1"])
@pytest.mark.parametrize("style", ["chat-template", "alpaca", "chatml"])
def test_masked_tokens_lie_inside_assistant_spans_and_cover_them(tokenizers, template, style):
    tok = tokenizers[template]
    renderer = ConversationRenderer(tok, RenderConfig(prompt_style=style))
    rendered = renderer.render_text(MULTI_TURN)
    [sample] = renderer.render_batch([MULTI_TURN])
    enc = tok.backend_tokenizer.encode(rendered.text, add_special_tokens=False)
    assert enc.ids == sample.ids.tolist()
    allowed = np.zeros(len(rendered.text) + 1, bool)
    for start, end in rendered.assistant_spans:
        allowed[start:end] = True
        if not rendered.eot_in_spans:  # the end-of-turn marker right after the content
            allowed[end:end + len(EOT[template])] = True
    covered = np.zeros_like(allowed)
    for (start, end), m in zip(enc.offsets, sample.mask):
        if m:
            assert allowed[start:end].all(), f"masked token {rendered.text[start:end]!r} outside assistant text"
            covered[start:end] = True
    for start, end in rendered.assistant_spans:
        assert covered[start:end].all(), "an assistant character is not learned"
    contents = [m["content"] for m in MULTI_TURN["messages"] if m["role"] == "assistant"]
    assert [rendered.text[s:e] for s, e in rendered.assistant_spans] == (
        contents if not rendered.eot_in_spans
        else [c + (tok.eos_token if style == "alpaca" else "<|im_end|>") for c in contents]
    )


def test_deepseek_template_rewrites_earlier_turns_and_mask_follows(tokenizers):
    tok = tokenizers["deepseek_r1"]
    record = {"messages": [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "<think>2 plus 3 is 5</think>The sum is 5."},
        {"role": "user", "content": "Double it."},
        {"role": "assistant", "content": "<think>5 times 2</think>It is 10."},
    ]}
    text = tok.apply_chat_template(record["messages"], tokenize=False)
    assert "2 plus 3 is 5" not in text  # the earlier thinking was removed by the template
    sample = render_one(tok, record)
    assert masked_runs(tok, sample.ids, sample.mask) == [
        "The sum is 5.<｜end▁of▁sentence｜>",
        "<think>5 times 2</think>It is 10.<｜end▁of▁sentence｜>",
    ]
    # <｜User｜> / <｜Assistant｜> headers are special tokens but never learned as end-of-turn
    header_ids = tok.convert_tokens_to_ids(["<｜User｜>", "<｜Assistant｜>"])
    assert not sample.mask[np.isin(sample.ids, header_ids)].any()


def test_loss_on_last_assistant_and_all(tokenizers):
    tok = tokenizers["chatml"]
    last = render_one(tok, MULTI_TURN, loss_on="last-assistant")
    assert masked_runs(tok, last.ids, last.mask) == ["Paris.<|im_end|>"]
    every = render_one(tok, MULTI_TURN, loss_on="all")
    assert every.mask.all()


def test_alpaca_prompt_style_golden_text(tokenizers):
    tok = tokenizers["llama3"]
    record = {"instruction": "Summarise", "input": "The cat sat.", "output": "A cat sat."}
    rendered = ConversationRenderer(tok, RenderConfig(prompt_style="alpaca")).render_text(record)
    assert rendered.text == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSummarise\n\n### Input:\nThe cat sat.\n\n### Response:\nA cat sat.<|eot_id|>"
    )
    sample = render_one(tok, record, prompt_style="alpaca")
    assert masked_runs(tok, sample.ids, sample.mask) == ["A cat sat.<|eot_id|>"]


def test_chatml_prompt_style_golden_text():
    r = render_chatml([Message("user", "Hi"), Message("assistant", "Hello")])
    assert r.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert [r.text[s:e] for s, e in r.assistant_spans] == ["Hello<|im_end|>"]
    r = render_alpaca([Message("system", "SYS"), Message("user", "Q"), Message("assistant", "A")], "</s>")
    assert r.text == "SYS\n\n### Instruction:\nQ\n\n### Response:\nA</s>"


def test_content_equal_to_a_role_name_is_found_after_the_header(tokenizers):
    tok = tokenizers["chatml"]
    record = {"messages": [{"role": "user", "content": "Say assistant"},
                           {"role": "assistant", "content": "assistant"}]}
    sample = render_one(tok, record)
    assert masked_runs(tok, sample.ids, sample.mask) == ["assistant<|im_end|>"]


def test_locate_messages_worked_example():
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert locate_messages(text, ["Hi", "Hello"], anchors=("<|im_end|>",)) == [(17, 19), (52, 57)]
    assert locate_messages(text, ["Hi", "Bye"]) == [(17, 19), None]
    assert content_candidates(" <think>x</think>\n\nFive. ") == [
        " <think>x</think>\n\nFive. ", "<think>x</think>\n\nFive.", "\n\nFive. ", "Five."]


def test_build_ids_and_mask_docstring_example():
    ids = np.array([7, 8, 9, 2])
    offsets = np.array([[0, 3], [3, 5], [5, 9], [9, 19]])
    out_ids, mask = build_ids_and_mask(ids, offsets, [(3, 9)], eot_ok=np.array([0, 0, 0, 1], bool))
    assert out_ids.tolist() == [7, 8, 9, 2] and mask.tolist() == [0, 1, 1, 1]
    _, mask = build_ids_and_mask(ids, offsets, [(3, 9)], eot_ok=np.array([0, 0, 0, 0], bool))
    assert mask.tolist() == [0, 1, 1, 0]


def test_long_samples_dropped_or_truncated_and_empty_masks_dropped(tokenizers):
    tok = tokenizers["chatml"]
    full = render_one(tok, MULTI_TURN)
    n = len(full.ids)
    assert isinstance(render_one(tok, MULTI_TURN, max_length=n - 1), RecordError)
    assert render_one(tok, MULTI_TURN, max_length=n - 1).reason == "too_long"
    cut = render_one(tok, MULTI_TURN, max_length=n - 1, truncate=True)
    assert cut.truncated and cut.ids.tolist() == full.ids[: n - 1].tolist()
    assert cut.mask.tolist() == full.mask[: n - 1].tolist()
    first_learned = int(np.argmax(full.mask))
    empty = render_one(tok, MULTI_TURN, max_length=first_learned, truncate=True)
    assert isinstance(empty, RecordError) and empty.reason == "no_loss_tokens"


def test_render_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="--loss-on"):
        RenderConfig(loss_on="user")
    with pytest.raises(ValueError, match="--truncate"):
        RenderConfig(truncate=True)
    with pytest.raises(ValueError, match="--prompt-style"):
        RenderConfig(prompt_style="vicuna")


def test_a_text_far_beyond_max_length_is_dropped_before_tokenizing(tokenizers):
    tok = tokenizers["chatml"]
    renderer = ConversationRenderer(tok, RenderConfig(max_length=64))
    longest = max(len(t) for t in tok.backend_tokenizer.get_vocab(with_added_tokens=True))
    assert renderer.char_limit == 4 * 64 * longest
    huge = {"messages": [{"role": "user", "content": "x" * (renderer.char_limit + 1)},
                         {"role": "assistant", "content": "y"}]}
    encoded = []

    class Spy:  # records what reaches the tokenizer
        def encode_batch(self, texts, **kw):
            encoded.extend(len(t) for t in texts)
            return tok.backend_tokenizer.encode_batch(texts, **kw)

    renderer.backend = Spy()
    [dropped, kept] = renderer.render_batch([huge, MULTI_TURN])
    assert dropped.reason == "too_long" and "--seq-length 64" in str(dropped)
    assert len(encoded) == 1 and encoded[0] < 1000  # only the short record was tokenized
    assert not isinstance(kept, RecordError)
    # the shortcut never drops what tokenizing would keep: the same record is too long either way
    assert len(tok(huge["messages"][0]["content"])["input_ids"]) > 64
    assert ConversationRenderer(tok, RenderConfig(max_length=64, truncate=True)).char_limit is None


def test_anchor_set_answers_as_startswith_with_the_tuple():
    import random

    from megatron.sft.data.chat_template import AnchorSet

    rng = random.Random(0)
    for _ in range(500):
        anchors = tuple({"".join(rng.choices("ab<>", k=rng.randint(0, 4))) for _ in range(rng.randint(0, 5))})
        text = "".join(rng.choices("ab<>", k=rng.randint(0, 8)))
        fast = AnchorSet(anchors)
        assert all(fast.starts(text, i) == text.startswith(anchors, i) for i in range(len(text) + 2))
