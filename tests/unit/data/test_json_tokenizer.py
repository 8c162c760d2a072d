"""The pre-tokenizer's transformers-free path (``json_tokenizer`` + ``template_compile``) gives
exactly what ``AutoTokenizer`` and ``apply_chat_template`` give.

References: transformers' ``apply_chat_template(tokenize=True)`` for the ids of every kept
sample, and the renderer on the ``AutoTokenizer`` (whose masks other tests check against HF) for
ids, masks and drops, on generated conversations over every tiny template (BPE trained here).
"""

import json
import random

import numpy as np
import pytest

from megatron.sft.data.json_tokenizer import json_tokenizer_refusal, load_json_tokenizer
from megatron.sft.data.render import ConversationRenderer, RenderConfig
from megatron.sft.data.tiny_tokenizer import TEMPLATES, save_tiny_tokenizer

WORDS = "the cat sat on 🙂 mat 你好 é assistant user <short> 42 \n think".split(" ")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def conversations(n=40, seed=0):
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choices(WORDS, k=rng.randint(1, k))) or "ok"

    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for t in range(1 + i % 4):
            msgs.append({"role": "user", "content": words(12)})
            turn = {"role": "assistant", "content": words(30)}
            if (i + t) % 3 == 0:
                turn["reasoning_content"] = words(20)
            elif (i + t) % 5 == 0:
                turn["content"] = f"<think>\n{words(20)}\n</think>\n\n{turn['content']}"
            msgs.append(turn)
        record = {"messages": msgs}
        if i % 7 == 6:  # a tool call and its result
            msgs[-1] = {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": words(2)}}}]}
            msgs += [{"role": "tool", "content": "sunny"}, {"role": "assistant", "content": words(10)}]
            record["tools"] = [WEATHER]
        out.append(record)
    return out


@pytest.fixture(scope="module")
def both(tokenizer_dirs):
    from transformers import AutoTokenizer

    return {name: (AutoTokenizer.from_pretrained(path), load_json_tokenizer(path))
            for name, path in tokenizer_dirs.items()}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_attributes_equal_autotokenizer(both, template):
    hf, ours = both[template]
    assert ours is not None
    assert ours.special_tokens_map == hf.special_tokens_map
    assert len(ours) == len(hf)
    assert ours.bos_token_id == hf.bos_token_id and ours.eos_token == hf.eos_token
    assert ours.get_chat_template() == hf.get_chat_template()
    assert {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()} == \
        {i: (t.content, t.special) for i, t in hf.added_tokens_decoder.items()}
    text = "<|im_start|>user\nHi 你好 🙂<short><|im_end|>\n  x"
    a, b = (t.backend_tokenizer.encode(text, add_special_tokens=False) for t in (hf, ours))
    assert (a.ids, a.offsets) == (b.ids, b.offsets)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_ids_and_masks_equal_transformers(both, template, loss_on):
    hf, ours = both[template]
    records = conversations()
    config = RenderConfig(loss_on=loss_on)
    ref, new = (ConversationRenderer(t, config).tokenize_chunk(records) for t in (hf, ours))
    assert new.errors == ref.errors
    assert np.array_equal(new.lengths, ref.lengths)
    assert np.array_equal(new.ids, ref.ids) and np.array_equal(new.mask, ref.mask)
    assert new.notices == ref.notices
    dropped = {i for i, *_ in new.errors}
    kept = [r for i, r in enumerate(records) if i not in dropped]
    assert len(kept) >= len(records) // 2, new.errors[:3]
    bounds = np.concatenate([[0], np.cumsum(new.lengths)])
    for k, record in enumerate(kept):
        expected = hf.apply_chat_template(record["messages"], tools=record.get("tools"), tokenize=True,
                                          return_dict=False)
        assert new.ids[bounds[k]:bounds[k + 1]].tolist() == list(expected)


def test_deepseek_like_config_with_added_tokens_decoder(tmp_path):
    """A config as HF ships them (added_tokens_decoder, AddedToken dicts) is read without
    transformers; anything transformers would change is refused (None: AutoTokenizer is used)."""
    folder = save_tiny_tokenizer(tmp_path / "ds", template="deepseek_r1")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    spec = json.loads((folder / "tokenizer.json").read_text())
    config["added_tokens_decoder"] = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                     "single_word", "special")}
                                      for t in spec["added_tokens"]}
    config["bos_token"] = {"__type": "AddedToken", "content": config["bos_token"], "lstrip": False}
    config_path.write_text(json.dumps(config))
    assert json_tokenizer_refusal(folder) is None
    from transformers import AutoTokenizer

    hf, ours = AutoTokenizer.from_pretrained(folder), load_json_tokenizer(folder)
    assert ours.special_tokens_map == hf.special_tokens_map and ours.bos_token_id == hf.bos_token_id
    records = conversations(12, seed=1)
    ref, new = (ConversationRenderer(t, RenderConfig()).tokenize_chunk(records) for t in (hf, ours))
    assert np.array_equal(new.ids, ref.ids) and np.array_equal(new.mask, ref.mask) and new.errors == ref.errors

    for change, reason in [
        (lambda c: c.update(tokenizer_class="LlamaTokenizerFast"), "tokenizer_class"),
        (lambda c: c.update(eos_token="</not-a-token>"), "eos_token"),
        (lambda c: c["added_tokens_decoder"]["0"].update(special=not c["added_tokens_decoder"]["0"]["special"]),
         "added_tokens_decoder"),
        (lambda c: c.update(chat_template=[{"name": "default", "template": "x"}]), "several"),
    ]:
        changed = json.loads(json.dumps(config))
        change(changed)
        config_path.write_text(json.dumps(changed))
        assert reason in json_tokenizer_refusal(folder)
        assert load_json_tokenizer(folder) is None
    config_path.write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    assert "chat template file" in json_tokenizer_refusal(folder)


def test_pre_tokenizing_imports_neither_torch_nor_transformers_nor_megatron_core(tokenizer_dirs, tmp_path):
    """Start-up: a tokenizer folder ``tokenizers`` can read alone, and the indexed files written
    without megatron-core, keep those imports (seconds each) out of the pre-tokenizer."""
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(conversations(1)[0]) + "\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from megatron.sft.data.preprocess import PreprocessConfig, preprocess\n"
        "preprocess(PreprocessConfig(input=sys.argv[2], tokenizer_model=sys.argv[3], "
        "output_prefix=sys.argv[4], progress=False))\n"
        "print(sorted(m for m in ('torch', 'transformers', 'megatron.core') if m in sys.modules))\n"
    )
    repo = Path(__file__).resolve().parents[3]
    run = subprocess.run([sys.executable, "-c", code, str(repo), str(data), str(tokenizer_dirs["deepseek_r1"]),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
