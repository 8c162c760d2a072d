"""Shapes real datasets ship: tools, tool calls and results, content parts, top-level system
prompts, per-turn loss flags, reasoning_content.

References, both independent of our renderer:
- ids: transformers' own ``apply_chat_template(messages, tools=tools, tokenize=True)`` on the
  record's messages as they are in the file (or, for ShareGPT, converted by hand);
- mask: the HF-rendered text cut by hand at each assistant header and end-of-turn token: the
  learned tokens must spell exactly each assistant block (header excluded, end-of-turn included).
"""

import json

import numpy as np
import pytest

from megatron.sft.data.chat_template import REASONING_NOT_RENDERED
from megatron.sft.data.formats import FieldMap, Message, RecordError, to_conversation
from megatron.sft.data.render import ConversationRenderer, RenderConfig

#: tool-capable template -> (assistant header, end-of-turn token) as the template writes them
TOOL_TEMPLATES = {
    "chatml_tools": ("<|im_start|>assistant\n", "<|im_end|>"),
    "llama3_tools": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def call(name, arguments, i=0):
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_RECORD = {
    "tools": [WEATHER, TIME],
    "messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            call("get_weather", {"city": "Paris"}, 0), call("get_time", {"city": "Paris"}, 1)]},
        {"role": "tool", "tool_call_id": "call_0", "content": "18 C, sunny"},
        {"role": "tool", "tool_call_id": "call_1", "content": "14:05"},
        {"role": "assistant", "content": "Sunny, 18 C; it is 14:05."},
    ],
}

OPENAI_STRING_ARGUMENTS = {  # OpenAI exports arguments as a JSON string; templates get it as is
    "tools": [WEATHER],
    "messages": [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [call("get_weather", '{"city": "Rome"}')]},
        {"role": "tool", "content": "21 C"},
        {"role": "assistant", "content": "21 C in Rome."},
    ],
}

CONTENT_PARTS = {"messages": [
    {"role": "user", "content": [{"type": "text", "text": "Add 2 "}, {"type": "text", "text": "and 3."}]},
    {"role": "assistant", "content": [{"type": "text", "text": "It is 5."}]},
]}

REASONING = {"messages": [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5.", "reasoning_content": "2 plus 3 is 5."},
]}

MESSAGES_SHAPES = {"tools": TOOL_RECORD, "string_arguments": OPENAI_STRING_ARGUMENTS,
                   "content_parts": CONTENT_PARTS, "reasoning": REASONING}


def masked_runs(tokenizer, ids, mask):
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(tokenizer.decode(ids[start:i]))
            start = None
    return runs


def assistant_blocks(text, header, eot):
    """Hand-cut reference: what follows each assistant header, up to and including the end-of-turn."""
    return [piece.split(eot)[0] + eot for piece in text.split(header)[1:]]


def render_one(tok, record, **config):
    [out] = ConversationRenderer(tok, RenderConfig(**config)).render_batch([record])
    return out


def check_against_hf(tok, template, record, messages, tools=None):
    header, eot = TOOL_TEMPLATES[template]
    sample = render_one(tok, record)
    assert not isinstance(sample, RecordError), sample
    assert sample.ids.tolist() == list(tok.apply_chat_template(messages, tools=tools, tokenize=True,
                                                               return_dict=False))
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert masked_runs(tok, sample.ids, sample.mask) == assistant_blocks(text, header, eot)
    return sample


@pytest.mark.parametrize("template", sorted(TOOL_TEMPLATES))
@pytest.mark.parametrize("shape", sorted(MESSAGES_SHAPES))
def test_messages_shapes_match_hf_ids_and_mask_the_rendered_assistant_text(tokenizers, template, shape):
    record = MESSAGES_SHAPES[shape]
    check_against_hf(tokenizers[template], template, record, record["messages"], record.get("tools"))


def test_tool_results_are_not_learned_even_with_loss_on_all(tokenizers):
    tok = tokenizers["llama3_tools"]
    every = render_one(tok, TOOL_RECORD, loss_on="all")
    assert every.ids.tolist() == render_one(tok, TOOL_RECORD).ids.tolist()
    assert masked_runs(tok, every.ids, 1 - every.mask) == ["18 C, sunny<|eot_id|>", "14:05<|eot_id|>"]
    tok = tokenizers["chatml_tools"]
    every = render_one(tok, TOOL_RECORD, loss_on="all")
    assert masked_runs(tok, every.ids, 1 - every.mask) == ["18 C, sunny", "14:05"]


def test_tool_call_golden_masks(tokenizers):
    """The learned text, written out: the calls as each template prints them, never the results."""
    tok = tokenizers["chatml_tools"]
    sample = render_one(tok, TOOL_RECORD)
    assert masked_runs(tok, sample.ids, sample.mask) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "Sunny, 18 C; it is 14:05.<|im_end|>",
    ]
    tok = tokenizers["llama3_tools"]
    sample = render_one(tok, TOOL_RECORD)
    assert masked_runs(tok, sample.ids, sample.mask) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}\n'
        '{"name": "get_time", "parameters": {"city": "Paris"}}<|eot_id|>',
        "Sunny, 18 C; it is 14:05.<|eot_id|>",
    ]
    # the tool results (and the tool list in the prompt) are in the ids but never learned
    text = tok.decode(sample.ids)
    assert "18 C, sunny" in text and "14:05<|eot_id|>" in text and "get_time" in text


@pytest.mark.parametrize("template", sorted(TOOL_TEMPLATES))
@pytest.mark.parametrize("tool_role", ["tool", "function", "observation", "ipython"])
def test_every_tool_role_spelling_renders_as_the_tool_role(tokenizers, template, tool_role):
    record = json.loads(json.dumps(TOOL_RECORD).replace('"role": "tool"', f'"role": "{tool_role}"'))
    check_against_hf(tokenizers[template], template, record, TOOL_RECORD["messages"], TOOL_RECORD["tools"])


@pytest.mark.parametrize("template", sorted(TOOL_TEMPLATES))
def test_sharegpt_top_level_system_and_llama_factory_tools(tokenizers, template):
    """OpenThoughts / LLaMA-Factory layout: ``system`` and ``tools`` (a JSON string) beside the turns."""
    record = {
        "system": "Think step by step.",
        "tools": json.dumps([WEATHER]),
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
            {"from": "observation", "value": "-3 C"},
            {"from": "gpt", "value": "It is -3 C."},
        ],
    }
    by_hand = [
        {"role": "system", "content": "Think step by step."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "-3 C"},
        {"role": "assistant", "content": "It is -3 C."},
    ]
    check_against_hf(tokenizers[template], template, record, by_hand, [WEATHER])


@pytest.mark.parametrize("template", ["chatml", "llama3", "deepseek_r1", "chatml_tools"])
@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_top_level_system_prompt_is_kept(tokenizers, template, fmt):
    tok = tokenizers[template]
    turns = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]
    if fmt == "sharegpt":
        record = {"system": "Be brief.", "conversations": [{"from": "human", "value": "2+3?"},
                                                            {"from": "gpt", "value": "5"}]}
    else:
        record = {"system": "Be brief.", "messages": turns}
    sample = render_one(tok, record)
    reference = tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + turns, tokenize=True,
                                        return_dict=False)
    assert sample.ids.tolist() == list(reference)
    assert "Be brief." in tok.decode(sample.ids)
    custom = render_one(tok, {"persona": "Be brief.", "messages": turns}, fields=FieldMap(system="persona"))
    assert custom.ids.tolist() == sample.ids.tolist()


def test_system_field_and_system_turn_together_is_a_bad_record():
    record = {"system": "A", "messages": [{"role": "system", "content": "B"}, {"role": "user", "content": "x"},
                                          {"role": "assistant", "content": "y"}]}
    with pytest.raises(RecordError, match="top-level 'system' field and a system turn") as err:
        to_conversation(record)
    assert err.value.reason == "duplicate_system"
    record["system"] = ""  # an empty column (LLaMA-Factory exports one per row) is no conflict
    assert to_conversation(record)[0] == Message("system", "B")


TWO_TURNS = {"messages": [
    {"role": "user", "content": "First?"},
    {"role": "assistant", "content": "Draft answer.", "loss": False},
    {"role": "user", "content": "Again?"},
    {"role": "assistant", "content": "Final answer."},
]}


@pytest.mark.parametrize("template", ["chatml", "llama3", "deepseek_r1", "llama3_tools"])
def test_per_turn_loss_overrides_loss_on(tokenizers, template):
    tok = tokenizers[template]
    eot = tok.eos_token
    sample = render_one(tok, TWO_TURNS)
    assert masked_runs(tok, sample.ids, sample.mask) == ["Final answer." + eot]
    assert sample.ids.tolist() == list(tok.apply_chat_template(TWO_TURNS["messages"], tokenize=True,
                                                               return_dict=False))
    weight = json.loads(json.dumps(TWO_TURNS).replace('"loss": false', '"weight": 0'))
    assert render_one(tok, weight).mask.tolist() == render_one(tok, TWO_TURNS).mask.tolist()
    # "loss": true brings an earlier turn back under --loss-on last-assistant
    learn_first = json.loads(json.dumps(TWO_TURNS).replace('"loss": false', '"loss": true'))
    sample = render_one(tok, learn_first, loss_on="last-assistant")
    assert masked_runs(tok, sample.ids, sample.mask) == ["Draft answer." + eot, "Final answer." + eot]
    # --loss-on all learns everything but the turn marked false and its end-of-turn token
    every = render_one(tok, TWO_TURNS, loss_on="all")
    unlearned = masked_runs(tok, every.ids, 1 - every.mask)
    assert unlearned == ["Draft answer." + eot]
    assert render_one(tok, TWO_TURNS, loss_on="all").ids.tolist() == render_one(tok, TWO_TURNS).ids.tolist()
    # every assistant turn switched off: nothing to learn, a counted policy drop
    none = json.loads(json.dumps(TWO_TURNS).replace('"content": "Final answer."}',
                                                    '"content": "Final answer.", "loss": false}'))
    assert render_one(tok, none).reason == "no_loss_tokens"


def test_reasoning_content_rendered_or_reported(tokenizers):
    tok = tokenizers["chatml_tools"]
    sample = render_one(tok, REASONING)
    assert masked_runs(tok, sample.ids, sample.mask) == [
        "<think>\n2 plus 3 is 5.\n</think>\n\n5.<|im_end|>"]
    renderer = ConversationRenderer(tok, RenderConfig())
    assert renderer.tokenize_chunk([REASONING]).notices == {}
    for template, config in (("chatml", {}), ("llama3_tools", {}), ("chatml", {"prompt_style": "chatml"})):
        renderer = ConversationRenderer(tokenizers[template], RenderConfig(**config))
        chunk = renderer.tokenize_chunk([REASONING, REASONING, CONTENT_PARTS])
        assert chunk.notices == {REASONING_NOT_RENDERED: 2} and len(chunk.lengths) == 3
        assert masked_runs(tokenizers[template], chunk.ids[:chunk.lengths[0]], chunk.mask[:chunk.lengths[0]]) == [
            "5.<|im_end|>" if template == "chatml" else "5.<|eot_id|>"]


RESULTS_ONLY = {"messages": TOOL_RECORD["messages"][:2] + TOOL_RECORD["messages"][3:]}


@pytest.mark.parametrize("record", [TOOL_RECORD, {"messages": TOOL_RECORD["messages"]}, RESULTS_ONLY])
@pytest.mark.parametrize("template, config", [("chatml", {}), ("deepseek_r1", {}), ("llama3", {}),
                                              ("chatml_tools", {"prompt_style": "chatml"}),
                                              ("chatml_tools", {"prompt_style": "alpaca"})])
def test_templates_without_tool_support_drop_with_a_reason(tokenizers, record, template, config):
    out = render_one(tokenizers[template], record, **config)
    if record is RESULTS_ONLY and template in ("chatml", "llama3") and not config:
        # these templates print any role generically: the tool results are in the text, unlearned
        tok = tokenizers[template]
        assert "18 C, sunny" in tok.decode(out.ids)
        assert masked_runs(tok, out.ids, out.mask) == ["Sunny, 18 C; it is 14:05." + tok.eos_token]
        return
    assert isinstance(out, RecordError) and out.reason == "template_no_tools", out
    assert "tool" in str(out)


@pytest.mark.parametrize("record, reason", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                   {"role": "assistant", "content": "A cat."}]}, "unsupported_content"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]},
                   {"role": "assistant", "content": "y"}]}, "wrong_type"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "loss": "no"}]},
     "wrong_type"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0.5}]},
     "wrong_type"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [call("f", {})]},
                   {"role": "assistant", "content": "y"}]}, "wrong_type"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": "f()"}]}, "wrong_type"),
    ({"tools": "{not json", "messages": [{"role": "user", "content": "x"},
                                         {"role": "assistant", "content": "y"}]}, "wrong_type"),
    ({"tools": [1], "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "wrong_type"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "f("}]}, "wrong_type"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": []}]},
     "empty_assistant"),
])
def test_new_shape_bad_records_have_reasons(record, reason):
    with pytest.raises(RecordError) as err:
        to_conversation(record)
    assert err.value.reason == reason and str(err.value)


def test_conversion_of_the_new_shapes():
    conv = to_conversation(TOOL_RECORD)
    assert conv.tools == [WEATHER, TIME]
    assert [m.role for m in conv] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert conv[2] == Message("assistant", "", tool_calls=TOOL_RECORD["messages"][2]["tool_calls"])
    assert conv[3] == Message("tool", "18 C, sunny", tool_call_id="call_0")
    assert to_conversation(CONTENT_PARTS)[0].content == "Add 2 and 3."
    assert to_conversation(REASONING)[1].reasoning == "2 plus 3 is 5."
    assert [m.loss for m in to_conversation(TWO_TURNS)] == [None, False, None, None]
    assert to_conversation({"messages": [{"role": "user", "content": "x", "loss": True},
                                         {"role": "assistant", "content": "y", "weight": 1}]})[1].loss is True
    assert to_conversation(CONTENT_PARTS).tools is None


def test_per_turn_mask_equals_numpy_reference_on_a_batch(tokenizers):
    """tokenize_chunk (one buffer) and render_batch (one sample each) agree on the new shapes."""
    tok = tokenizers["chatml_tools"]
    renderer = ConversationRenderer(tok, RenderConfig())
    batch = list(MESSAGES_SHAPES.values()) + [TWO_TURNS, {"messages": []}]
    samples = renderer.render_batch(batch)
    chunk = renderer.tokenize_chunk(batch)
    kept = [s for s in samples if not isinstance(s, RecordError)]
    assert [r for _, r, _ in chunk.errors] == ["no_assistant"]
    assert chunk.ids.tolist() == np.concatenate([s.ids for s in kept]).tolist()
    assert chunk.mask.tolist() == np.concatenate([s.mask for s in kept]).tolist()
    assert chunk.loss_tokens.tolist() == [int(s.mask.sum()) for s in kept]


# Qwen3's habit, written here: the final assistant turn always opens a <think> block, empty when
# the message has no reasoning. The marker render then differs from the real one *inside* that
# block, and the learned text must still start right after the assistant header.
ALWAYS_THINK_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' and loop.last -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + (m.reasoning_content or '') + '\\n</think>\\n\\n' + m.content -}}"
    "{%- for call in m.tool_calls or [] -%}{{- '<tool_call>' + call.function.name + '</tool_call>' -}}{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="module")
def always_think(tmp_path_factory):
    from transformers import AutoTokenizer

    from megatron.sft.data.tiny_tokenizer import save_tiny_tokenizer

    path = save_tiny_tokenizer(tmp_path_factory.mktemp("think"), template="chatml_tools")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = ALWAYS_THINK_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("last", [
    {"role": "assistant", "content": "5.", "reasoning_content": "2 plus 3 is 5."},
    {"role": "assistant", "content": "", "tool_calls": [call("add", {"a": 2, "b": 3})]},
])
def test_text_the_template_puts_between_header_and_body_is_learned(always_think, last):
    messages = [{"role": "user", "content": "What is 2 + 3?"}, last]
    sample = render_one(always_think, {"messages": messages})
    text = always_think.apply_chat_template(messages, tokenize=False)
    assert sample.ids.tolist() == list(always_think.apply_chat_template(messages, tokenize=True, return_dict=False))
    [run] = masked_runs(always_think, sample.ids, sample.mask)
    assert run == assistant_blocks(text, "<|im_start|>assistant\n", "<|im_end|>")[0]
    assert run.startswith("<think>\n") and run.endswith("<|im_end|>")


def test_parquet_rows_with_null_filled_structs_render_like_the_json_records(tokenizers, tmp_path):
    """Arrow unifies the turn structs: every turn gets every key (tool_calls, loss, ... = None)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron.sft.data.readers import iter_records

    records = [TOOL_RECORD, {"tools": [WEATHER, TIME], "messages": TWO_TURNS["messages"]}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    rows = [r.payload for r in iter_records(tmp_path / "d.parquet")]
    assert rows[1]["messages"][0]["tool_calls"] is None and rows[0]["messages"][0]["loss"] is None
    renderer = ConversationRenderer(tokenizers["chatml_tools"], RenderConfig())
    for got, want in zip(renderer.render_batch(rows), renderer.render_batch(records)):
        assert got.ids.tolist() == want.ids.tolist() and got.mask.tolist() == want.mask.tolist()
