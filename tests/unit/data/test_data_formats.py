"""Record formats -> one Conversation form; every bad-record reason has a case."""

import pytest

from megatron.sft.data.formats import FieldMap, Message, RecordError, detect_format, to_conversation

EXPECTED = [Message("system", "Be brief."), Message("user", "2+3?"), Message("assistant", "5")]


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
                       {"role": "assistant", "content": "5"}]}, "messages"),
        ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+3?"},
                            {"from": "gpt", "value": "5"}]}, "sharegpt"),
        ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "2+3?"},
                            {"from": "assistant", "value": "5"}]}, "sharegpt"),
        ({"system": "Be brief.", "instruction": "2+3?", "output": "5"}, "alpaca"),
        ({"system": "Be brief.", "question": "2+3?", "answer": "5"}, "alpaca"),
        ({"system": "Be brief.", "prompt": "2+3?", "response": "5"}, "alpaca"),
    ],
)
def test_every_format_becomes_the_same_conversation(record, fmt):
    assert detect_format(record) == fmt
    assert to_conversation(record) == EXPECTED
    assert to_conversation(record, fmt) == EXPECTED


def test_alpaca_input_is_kept_apart_and_joined_for_templates():
    [user, reply] = to_conversation({"instruction": "Summarise", "input": "A long text.", "output": "Short."})
    assert (user.content, user.context) == ("Summarise", "A long text.")
    assert user.full_text() == "Summarise\n\nA long text."
    assert reply == Message("assistant", "Short.")


def test_custom_fields_for_both_shapes():
    fields = FieldMap(prompt="q", response="a", system="sys")
    assert to_conversation({"q": "2+3?", "a": "5", "sys": "Be brief."}, fields=fields) == EXPECTED
    fields = FieldMap(messages="dialog", role="speaker", content="text")
    record = {"dialog": [{"speaker": "system", "text": "Be brief."}, {"speaker": "human", "text": "2+3?"},
                         {"speaker": "bot", "text": "5"}]}
    assert to_conversation(record, fields=fields) == EXPECTED


@pytest.mark.parametrize(
    "record, reason",
    [
        ([1, 2], "wrong_type"),
        ({"text": "plain pretraining text"}, "unknown_format"),
        ({"messages": "hello"}, "wrong_type"),
        ({"messages": ["hello"]}, "wrong_type"),
        ({"messages": [{"role": "user"}]}, "missing_field"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "wrong_type"),
        ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
        ({"messages": [{"role": None, "content": "x"}]}, "unknown_role"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no_assistant"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "empty_assistant"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}, "empty_assistant"),
        ({"instruction": "x"}, "missing_field"),
        ({"instruction": "x", "output": ["a"]}, "wrong_type"),
        ({"instruction": "x", "output": ""}, "empty_assistant"),
    ],
)
def test_bad_records_raise_with_a_reason(record, reason):
    with pytest.raises(RecordError) as err:
        to_conversation(record)
    assert err.value.reason == reason
    assert str(err.value)  # a human-readable message, not just the code


def test_record_errors_survive_pickling_to_worker_processes():
    import pickle

    err = pickle.loads(pickle.dumps(RecordError("record_too_large", "the line is 9 bytes")))
    assert (err.reason, str(err)) == ("record_too_large", "the line is 9 bytes")


def test_the_format_table_drives_detection_conversion_and_choices():
    from megatron.sft.data.formats import FORMATS, RECORD_FORMATS, Conversation, record_format

    examples = {
        "messages": {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]},
        "sharegpt": {"conversations": [{"from": "human", "value": "2+3?"}, {"from": "gpt", "value": "5"}]},
        "alpaca": {"instruction": "2+3?", "output": "5"},
    }
    assert FORMATS == ("auto", *examples) and set(RECORD_FORMATS) == set(examples)
    for name, record in examples.items():
        assert detect_format(record) == name and to_conversation(record, name) == EXPECTED[1:]
        assert RECORD_FORMATS[name].example  # shown in --format's help
    # adding a format is one decorated function: detection and conversion pick it up
    try:
        @record_format("query_reply", detect=lambda r, f: "query" in r, example="{'query', 'reply'}")
        def _from_query_reply(record, fields):
            return Conversation([Message("user", record["query"]), Message("assistant", record["reply"])])

        assert to_conversation({"query": "2+3?", "reply": "5"}) == EXPECTED[1:]
    finally:
        RECORD_FORMATS.pop("query_reply", None)


@pytest.mark.parametrize("roles, problem", [
    (["system", "user", "assistant", "user", "assistant"], None),
    (["user", "assistant", "tool", "tool", "assistant"], None),
    (["user", "assistant", "tool", "user", "assistant"], None),
    (["assistant", "user", "assistant"], "turn 0 (assistant) is the first turn"),
    (["system", "assistant"], "turn 1 (assistant) follows a system turn"),
    (["user", "user", "assistant"], "turn 1 (user) follows a user turn"),
    (["user", "assistant", "assistant"], "turn 2 (assistant) follows an assistant turn"),
    (["user", "tool", "assistant"], "turn 1 (tool) follows a user turn"),
    (["user", "system", "assistant"], "turn 1 (system) follows a user turn"),
])
def test_roles_out_of_order_are_named(roles, problem):
    from megatron.sft.data.formats import role_order_problem

    assert role_order_problem([Message(r, "x") for r in roles]) == problem
