"""The in-process tokenizer is a real HF tokenizer: AutoTokenizer loads it, text round-trips."""

import pytest

from megatron.sft.data.tiny_tokenizer import save_tiny_tokenizer

MESSAGES = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>t</think>Hello"}]


@pytest.mark.parametrize(
    "template, expected",
    [
        ("chatml", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\n<think>t</think>Hello<|im_end|>\n"),
        ("llama3", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n<think>t</think>Hello<|eot_id|>"),
        ("deepseek_r1", "<｜begin▁of▁sentence｜>S<｜User｜>Hi<｜Assistant｜><think>t</think>Hello"
                        "<｜end▁of▁sentence｜>"),
        # without tools, the tool-capable templates print a conversation as their base style does
        ("chatml_tools", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                         "<|im_start|>assistant\n<think>t</think>Hello<|im_end|>\n"),
        ("llama3_tools", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                         "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n<think>t</think>Hello<|eot_id|>"),
    ],
)
def test_templates_render_as_designed(tokenizers, template, expected):
    tok = tokenizers[template]
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == expected
    ids = tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=False)
    assert tok.decode(ids) == expected  # byte-level BPE: exact round trip, specials kept whole


def test_unicode_round_trip_and_added_tokens(tmp_path):
    from transformers import AutoTokenizer

    path = save_tiny_tokenizer(tmp_path / "t", template="chatml", extra_tokens=["<short>"])
    tok = AutoTokenizer.from_pretrained(path)
    text = "naïve café 東京 🚀 <short> done"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.convert_tokens_to_ids("<short>") in tok(text)["input_ids"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    with pytest.raises(ValueError, match="choose one of"):
        save_tiny_tokenizer(tmp_path / "u", template="vicuna")
