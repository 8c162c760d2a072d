"""Pure tokenizer edits: flag parsing, validation and the consistent rename across files.

The tokenizer here is a hand-written dict shaped like a Qwen tokenizer folder (ids 0/1 are
<s>/</s> and also live in model.vocab; 5/6 are reserved special tokens), so every test runs in
milliseconds without training or loading anything.
"""

import json

import pytest

from megatron.sft.data.tokenizer_edit import (
    RenameRequest,
    TokenChange,
    TokenizerEditError,
    TokenizerFiles,
    apply_edits,
    check_chat_template,
    current_chat_template,
    parse_rename,
    parse_rename_id,
    plan_edit,
    render_files,
    resolve_renames,
)


def _added(i, content, special=True):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def make_files(jinja=None, config_template="T"):
    tokenizer_json = {
        "added_tokens": [_added(0, "<s>"), _added(1, "</s>"), _added(5, "<|quad_start|>"),
                         _added(6, "<|quad_end|>")],
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}},
        },
        "model": {"type": "BPE", "unk_token": None, "merges": [["a", "b"]],
                  "vocab": {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}},
    }
    config = {
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "__type": "AddedToken"},
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                 for t in tokenizer_json["added_tokens"]},
        "additional_special_tokens": ["<|quad_start|>", "<|quad_end|>"],
    }
    if config_template is not None:
        config["chat_template"] = config_template
    stmap = {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
             "additional_special_tokens": ["<|quad_start|>", "<|quad_end|>"]}
    added_json = {"<|quad_start|>": 5, "<|quad_end|>": 6}
    raw = {"tokenizer.json": json.dumps(tokenizer_json, indent=2),
           "tokenizer_config.json": json.dumps(config, indent=4) + "\n",
           "special_tokens_map.json": json.dumps(stmap),
           "added_tokens.json": json.dumps(added_json, indent=2)}
    if jinja is not None:
        raw["chat_template.jinja"] = jinja
    return TokenizerFiles(tokenizer_json, config, stmap, added_json, jinja, raw=raw)


# --------------------------------------------------------------------------- flag parsing
@pytest.mark.parametrize("spec, old, new, special", [
    ("<|quad_start|>=<short>", "<|quad_start|>", "<short>", None),
    ("<|quad_start|>=<short>:non-special", "<|quad_start|>", "<short>", False),
    ("<x>=<y>:special", "<x>", "<y>", True),
    ("<a:b>=<c:d>", "<a:b>", "<c:d>", None),      # a colon inside a name is not a suffix
    ("<x>=<y=z>", "<x>", "<y=z>", None),          # split at the first '='
])
def test_parse_rename(spec, old, new, special):
    req = parse_rename(spec)
    assert (req.old, req.new, req.special, req.token_id) == (old, new, special, None)


def test_parse_rename_id():
    assert parse_rename_id("151650=<short>:non-special") == RenameRequest(
        new="<short>", token_id=151650, special=False, spec="151650=<short>:non-special")


@pytest.mark.parametrize("parse, spec", [
    (parse_rename, "<short>"), (parse_rename, "=<short>"), (parse_rename, "<x>="),
    (parse_rename, "<x>= <y>"), (parse_rename_id, "-1=<y>"), (parse_rename_id, "abc=<y>"),
    (parse_rename_id, "5"),
])
def test_parse_refuses_malformed_flags(parse, spec):
    with pytest.raises(TokenizerEditError) as err:
        parse(spec)
    assert repr(spec) in str(err.value)  # the message quotes the flag as typed


# --------------------------------------------------------------------------- resolving
def test_resolve_by_name_and_by_id_give_the_same_change():
    files = make_files()
    expected = [TokenChange(5, "<|quad_start|>", "<short>", was_special=True, special=False)]
    assert resolve_renames(files, [parse_rename("<|quad_start|>=<short>:non-special")]) == expected
    assert resolve_renames(files, [parse_rename_id("5=<short>:non-special")]) == expected
    assert expected[0].describe() == "5: '<|quad_start|>' -> '<short>', special -> non-special"


def test_resolve_keeps_the_special_flag_without_a_suffix():
    (change,) = resolve_renames(make_files(), [parse_rename("<|quad_end|>=<end>")])
    assert change.special and change.was_special


@pytest.mark.parametrize("specs, message", [
    (["99=<x>"], "token id 99 does not exist"),
    (["3=<x>"], "ordinary vocabulary token ('b')"),
    (["<|quad_strat|>=<x>"], "Did you mean '<|quad_start|>'"),
    (["ab=<x>"], "ordinary vocabulary token, not an added token"),
    (["<|quad_start|>=<|quad_end|>"], "already taken by token id 6"),
    (["<|quad_start|>=ab"], "already taken by token id 4"),       # a model.vocab entry
    (["<|quad_start|>=<|quad_start|>"], "changes nothing"),
    (["<|quad_start|>=<a>", "5=<b>"], "renamed twice"),
    (["</s>=<eos>:non-special"], "eos_token and must stay special"),
])
def test_resolve_refuses_bad_requests(specs, message):
    reqs = [parse_rename_id(s) if s.split("=")[0].isdigit() else parse_rename(s) for s in specs]
    with pytest.raises(TokenizerEditError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("|", r"\|")):
        resolve_renames(make_files(), reqs)


def test_resolve_allows_swapping_two_names():
    changes = resolve_renames(make_files(), [parse_rename("<|quad_start|>=<|quad_end|>"),
                                             parse_rename("<|quad_end|>=<|quad_start|>")])
    assert [(c.token_id, c.new) for c in changes] == [(5, "<|quad_end|>"), (6, "<|quad_start|>")]


def test_flag_only_change_is_allowed():
    (change,) = resolve_renames(make_files(), [parse_rename("<|quad_end|>=<|quad_end|>:non-special")])
    assert not change.renamed and not change.special


# --------------------------------------------------------------------------- applying
def test_original_usage_rename_touches_every_file_and_nothing_else():
    files = make_files()
    before = json.dumps([files.tokenizer_json, files.tokenizer_config, files.special_tokens_map])
    changes = resolve_renames(files, [parse_rename("<|quad_start|>=<short>:non-special")])
    out = apply_edits(files, changes)

    assert json.dumps([files.tokenizer_json, files.tokenizer_config,
                       files.special_tokens_map]) == before  # input untouched
    assert out.tokenizer_json["added_tokens"][2] == _added(5, "<short>", special=False)
    assert out.tokenizer_config["added_tokens_decoder"]["5"]["content"] == "<short>"
    assert out.tokenizer_config["added_tokens_decoder"]["5"]["special"] is False
    # a non-special token must not stay listed as an additional special token
    assert out.tokenizer_config["additional_special_tokens"] == ["<|quad_end|>"]
    assert out.special_tokens_map["additional_special_tokens"] == ["<|quad_end|>"]
    assert out.added_tokens_json == {"<short>": 5, "<|quad_end|>": 6}
    assert out.tokenizer_json["model"] == files.tokenizer_json["model"]
    assert out.tokenizer_json["post_processor"] == files.tokenizer_json["post_processor"]
    assert sorted(render_files(out)) == ["added_tokens.json", "special_tokens_map.json",
                                         "tokenizer.json", "tokenizer_config.json"]


def test_renaming_a_vocab_and_role_token_updates_vocab_post_processor_and_roles():
    files = make_files()
    out = apply_edits(files, resolve_renames(files, [parse_rename("<s>=<bos>")]))
    model = out.tokenizer_json["model"]
    assert model["vocab"] == {"<bos>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}
    assert list(model["vocab"]) == ["<bos>", "</s>", "a", "b", "ab"]  # order kept
    post = out.tokenizer_json["post_processor"]
    assert post["single"][0] == {"SpecialToken": {"id": "<bos>", "type_id": 0}}
    assert post["special_tokens"] == {"<bos>": {"id": "<bos>", "ids": [0], "tokens": ["<bos>"]}}
    assert post["single"][1] == {"Sequence": {"id": "A", "type_id": 0}}
    assert out.tokenizer_config["bos_token"] == "<bos>"
    assert out.special_tokens_map["bos_token"] == {"content": "<bos>", "lstrip": False}
    assert out.tokenizer_config["added_tokens_decoder"]["0"]["special"] is True


def test_named_extra_special_tokens_are_renamed():
    files = make_files()
    files.tokenizer_config["extra_special_tokens"] = {"quad_token": "<|quad_end|>"}
    out = apply_edits(files, resolve_renames(files, [parse_rename("<|quad_end|>=<end>")]))
    assert out.tokenizer_config["extra_special_tokens"] == {"quad_token": "<end>"}


def test_unigram_list_vocab_is_renamed_by_index():
    files = make_files()
    files.tokenizer_json["model"] = {"type": "Unigram", "vocab": [["<s>", 0.0], ["</s>", 0.0]]}
    out = apply_edits(files, resolve_renames(files, [parse_rename("</s>=<eos>")]))
    assert out.tokenizer_json["model"]["vocab"] == [["<s>", 0.0], ["<eos>", 0.0]]


# --------------------------------------------------------------------------- chat template
@pytest.mark.parametrize("jinja, config_template, in_jinja, in_config", [
    (None, "T", None, "NEW"),        # the original usage: the config holds it
    ("T", None, "NEW", None),        # transformers 5 layout: chat_template.jinja only
    ("T", "T", "NEW", "NEW"),        # both: keep them in step
    (None, None, None, "NEW"),       # none yet: goes into the config
])
def test_chat_template_goes_where_the_folder_keeps_it(jinja, config_template, in_jinja, in_config):
    out = apply_edits(make_files(jinja, config_template), [], chat_template="NEW")
    assert out.chat_template_jinja == in_jinja
    assert out.tokenizer_config.get("chat_template") == in_config
    assert current_chat_template(out) == "NEW"


def test_named_chat_templates_replace_the_default():
    files = make_files(config_template=[{"name": "default", "template": "T"},
                                        {"name": "tool_use", "template": "U"}])
    out = apply_edits(files, [], chat_template="NEW")
    assert out.tokenizer_config["chat_template"][0] == {"name": "default", "template": "NEW"}
    assert out.tokenizer_config["chat_template"][1]["template"] == "U"


def test_invalid_or_identical_chat_template_is_refused():
    with pytest.raises(TokenizerEditError, match="not valid Jinja.*line 1"):
        check_chat_template("{% if x %}")
    check_chat_template("{% for m in messages %}{{ m['content'] }}{% break %}{% endfor %}")
    with pytest.raises(TokenizerEditError, match="nothing to change.*identical"):
        plan_edit(make_files(), [], chat_template="T")
    with pytest.raises(TokenizerEditError, match="nothing to change.*no --rename"):
        plan_edit(make_files(), [], chat_template=None)


# --------------------------------------------------------------------------- serialising
def test_render_keeps_each_files_layout_and_skips_unchanged_files():
    files = make_files(jinja="T")
    out = apply_edits(files, resolve_renames(files, [parse_rename("<|quad_end|>=<end>")]))
    text = render_files(out)
    assert "chat_template.jinja" not in text
    assert "\n" not in text["special_tokens_map.json"]                 # was compact
    assert text["tokenizer_config.json"].startswith('{\n    "bos_token"')  # was indent=4
    assert text["tokenizer_config.json"].endswith("}\n")
    assert text["tokenizer.json"].startswith('{\n  "added_tokens"') and text["tokenizer.json"].endswith("}")
    assert json.loads(text["tokenizer.json"]) == out.tokenizer_json
