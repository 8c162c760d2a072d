"""Prompts for --eval-generate against transformers' own chat rendering: a conversation cut
before its first assistant turn is token for token ``apply_chat_template(turns before it,
add_generation_prompt=True)``, the reference is that turn plus its end-of-turn token, and the
stop tokens are the template's end-of-turn token and EOS."""

import json

import pytest

from megatron.sft.data.eval_prompts import (
    EvalPrompt,
    cut_before_first_answer,
    prompt_from_record,
    prompts_from_file,
    prompts_from_samples,
    renderer_for,
    stop_token_ids,
)

EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "deepseek_r1": "<｜end▁of▁sentence｜>"}
TURNS = [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "What is 2 + 3?"},
         {"role": "assistant", "content": "It is 5."},
         {"role": "user", "content": "And doubled?"},
         {"role": "assistant", "content": "10."}]


def _hf_prompt(tokenizer, messages):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_cut_before_first_answer():
    assert cut_before_first_answer([1, 2, 3, 4, 5], [0, 1, 1, 0, 1]) == ([1], [2, 3])
    assert cut_before_first_answer([1, 2], [1, 1]) == ([], [1, 2])
    with pytest.raises(ValueError, match="2 token ids but 1"):
        cut_before_first_answer([1, 2], [0])


def test_samples_learned_from_the_first_token_have_no_prompt():
    got = prompts_from_samples([([1, 2, 3], [0, 1, 1], "a"), ([4, 5], [1, 1], "b")])
    assert got == [EvalPrompt((1,), (2, 3), "a")]


@pytest.mark.parametrize("template", sorted(EOT))
def test_record_prompt_is_the_generation_prompt_of_the_turns_before_the_answer(template,
                                                                                tokenizers):
    tok = tokenizers[template]
    got = prompt_from_record({"messages": TURNS}, renderer_for(tok), "f:1")
    assert list(got.ids) == _hf_prompt(tok, TURNS[:2])
    assert tok.decode(list(got.reference)) == "It is 5." + EOT[template]
    assert got.source == "f:1"


@pytest.mark.parametrize("template", sorted(EOT))
def test_prompt_only_record_gets_the_generation_prompt(template, tokenizers):
    tok = tokenizers[template]
    sharegpt = {"conversations": [{"from": "human", "value": "What is 2 + 3?"}],
                "system": "You are terse."}
    got = prompt_from_record(sharegpt, renderer_for(tok), "f:2")
    assert list(got.ids) == _hf_prompt(tok, TURNS[:2]) and got.reference == ()


@pytest.mark.parametrize("template", sorted(EOT))
def test_stop_tokens_are_the_end_of_turn_and_eos(template, tokenizers):
    tok = tokenizers[template]
    want = [tok.convert_tokens_to_ids(EOT[template])]
    if tok.eos_token_id not in want:
        want.append(tok.eos_token_id)
    assert list(stop_token_ids(renderer_for(tok))) == want


def test_prompts_file(tokenizers, tmp_path):
    tok = tokenizers["chatml"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (
        {"messages": TURNS}, {"messages": TURNS[1:2]}, {"instruction": "Hi", "output": "Hey"})))
    got = prompts_from_file(str(path), renderer_for(tok), limit=2)
    assert [p.source for p in got] == [f"{path}:1", f"{path}:2"]
    assert list(got[1].ids) == _hf_prompt(tok, TURNS[1:2])


def test_prompts_file_errors_name_the_file_and_line(tokenizers, tmp_path):
    renderer = renderer_for(tokenizers["chatml"])
    with pytest.raises(ValueError, match="--eval-prompts .*missing.jsonl: no such file"):
        prompts_from_file(str(tmp_path / "missing.jsonl"), renderer, 2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": TURNS}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed_json"):
        prompts_from_file(str(bad), renderer, 5)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no record"):
        prompts_from_file(str(empty), renderer, 5)
