"""scripts/checkpoints/edit_tokenizer.py end to end on a tiny in-process tokenizer, checked
through transformers: the original usage's <|quad_start|> -> <short> rename, chat template
replacement, and every refused input leaving the folder byte-identical with nothing else written.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.sft.data import tokenizer_edit_io
from megatron.sft.data.tiny_tokenizer import save_tiny_tokenizer

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "checkpoints" / "edit_tokenizer.py"
RESERVED = ["<|quad_start|>", "<|quad_end|>"]
NEW_TEMPLATE = ("{% for message in messages %}{{ '<｜' + message['role'] + '｜>' + "
                "message['content'] }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<｜Assistant｜><short>' }}{% endif %}")


def _load_script():
    spec = importlib.util.spec_from_file_location("edit_tokenizer_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = _load_script()


@pytest.fixture(scope="module")
def qwen_like_dir(tmp_path_factory):
    """A DeepSeek-R1-Distill-Qwen-shaped folder: reserved special tokens, added_tokens_decoder,
    additional_special_tokens, special_tokens_map.json, and stand-ins for config and weights."""
    path = save_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "model", template="deepseek_r1",
                               extra_tokens=RESERVED, extra_tokens_special=True)
    tj = json.loads((path / "tokenizer.json").read_text())
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    cfg["added_tokens_decoder"] = {str(t["id"]): {k: t[k] for k in keys} for t in tj["added_tokens"]}
    cfg["additional_special_tokens"] = list(RESERVED)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    stmap = {"bos_token": cfg["bos_token"], "eos_token": cfg["eos_token"],
             "pad_token": cfg["pad_token"], "additional_special_tokens": list(RESERVED)}
    (path / "special_tokens_map.json").write_text(json.dumps(stmap, indent=2, ensure_ascii=False))
    (path / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    (path / "model.safetensors").write_bytes(b"not really weights")
    return path


@pytest.fixture
def tok_dir(qwen_like_dir, tmp_path):
    dst = tmp_path / "src" / "model"
    shutil.copytree(qwen_like_dir, dst)
    return dst


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv):
    rc = CLI.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def quad_id(path):
    return next(t["id"] for t in json.loads((path / "tokenizer.json").read_text())["added_tokens"]
                if t["content"] == "<|quad_start|>")


def test_original_usage_rename_to_output_dir(tok_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    before = snapshot(tok_dir)
    token_id = quad_id(tok_dir)
    out_dir = tmp_path / "edited"
    rc, out, err = run_cli(capsys, "--tokenizer-model", tok_dir, "--rename",
                           "<|quad_start|>=<short>:non-special", "--output-dir", out_dir)
    assert rc == 0, err
    assert f"renamed {token_id}: '<|quad_start|>' -> '<short>', special -> non-special" in out
    assert snapshot(tok_dir) == before                       # source untouched
    assert set(snapshot(out_dir)) == set(before)             # weights and config copied
    assert (out_dir / "model.safetensors").read_bytes() == before["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited", "src"]  # no temp folder left
    assert oct(out_dir.stat().st_mode & 0o777) != oct(0o700)

    tok = AutoTokenizer.from_pretrained(out_dir)
    assert tok.convert_tokens_to_ids("<short>") == token_id
    assert tok.convert_ids_to_tokens(token_id) == "<short>"
    ids = tok.encode("First think.<short>Then answer.", add_special_tokens=False)
    assert ids.count(token_id) == 1                          # one token inside ordinary text
    assert "<short>" in tok.decode(ids, skip_special_tokens=True)  # a control token, not special
    assert token_id not in tok.all_special_ids
    assert "<|quad_start|>" not in tok.get_vocab()
    # the untouched reserved token is still special
    end_id = tok.convert_tokens_to_ids("<|quad_end|>")
    assert "<|quad_end|>" not in tok.decode([end_id], skip_special_tokens=True)
    cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    assert cfg["added_tokens_decoder"][str(token_id)]["content"] == "<short>"
    assert cfg["additional_special_tokens"] == ["<|quad_end|>"]


@pytest.mark.parametrize("layout", ["config", "jinja"])
def test_in_place_rename_by_id_and_chat_template(tok_dir, tmp_path, capsys, layout):
    from transformers import AutoTokenizer

    if layout == "jinja":  # the transformers 5 layout keeps the template in its own file
        cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
        (tok_dir / "chat_template.jinja").write_text(cfg.pop("chat_template"))
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    os.chmod(tok_dir / "tokenizer.json", 0o644)
    template_file = tmp_path / "hybrid.jinja"
    template_file.write_text(NEW_TEMPLATE)
    token_id = quad_id(tok_dir)
    names_before = sorted(p.name for p in tok_dir.iterdir())

    rc, out, err = run_cli(capsys, "--tokenizer-model", tok_dir, "--rename-id",
                           f"{token_id}=<short>:non-special", "--chat-template", template_file,
                           "--in-place")
    assert rc == 0, err
    assert "replaced the chat template" in out
    assert sorted(p.name for p in tok_dir.iterdir()) == names_before  # no temp files left
    assert (tok_dir / "tokenizer.json").stat().st_mode & 0o777 == 0o644
    if layout == "jinja":
        assert (tok_dir / "chat_template.jinja").read_text() == NEW_TEMPLATE
        assert "chat_template" not in json.loads((tok_dir / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert tok.chat_template == NEW_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == "<｜user｜>Hi<｜Assistant｜><short>"
    assert tok.encode(prompt, add_special_tokens=False)[-1] == token_id


@pytest.mark.parametrize("args, message", [
    (["--rename-id", "99999=<short>"], "token id 99999 does not exist"),
    (["--rename", "<|quad_strt|>=<short>"], "Did you mean '<|quad_start|>'"),
    (["--rename", "<|quad_start|>=<|quad_end|>"], "already taken by token id"),
    (["--rename", "<|quad_start|>=<|im_end|>"], "already taken by token id"),
    ([], "nothing to change"),
    (["--rename", "<|quad_start|>=<|quad_start|>:special"], "changes nothing"),
    (["--rename", "<short>"], "--rename expects OLD=NEW"),
    (["--chat-template", "missing.jinja"], "--chat-template file not found"),
])
@pytest.mark.parametrize("where", ["--output-dir", "--in-place"])
def test_bad_input_exits_2_and_writes_nothing(tok_dir, tmp_path, capsys, args, message, where):
    before, tree_before = snapshot(tok_dir), snapshot(tmp_path)
    dest = [where, tmp_path / "out"] if where == "--output-dir" else [where]
    rc, out, err = run_cli(capsys, "--tokenizer-model", tok_dir, *args, *dest)
    assert rc == 2
    assert err.startswith("error: ") and message in err and out == ""
    assert snapshot(tmp_path) == tree_before and snapshot(tok_dir) == before


def test_identical_chat_template_is_a_no_op(tok_dir, tmp_path, capsys):
    same = tmp_path / "same.jinja"
    same.write_text(json.loads((tok_dir / "tokenizer_config.json").read_text())["chat_template"])
    before = snapshot(tok_dir)
    rc, _, err = run_cli(capsys, "--tokenizer-model", tok_dir, "--chat-template", same, "--in-place")
    assert rc == 2 and "the chat template is identical" in err
    assert snapshot(tok_dir) == before


def test_existing_output_dir_and_missing_destination_are_refused(tok_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    rename = ["--rename", "<|quad_start|>=<short>"]
    rc, _, err = run_cli(capsys, "--tokenizer-model", tok_dir, *rename, "--output-dir", tmp_path / "taken")
    assert rc == 2 and "already exists and is not empty" in err
    rc, _, err = run_cli(capsys, "--tokenizer-model", tok_dir, *rename)
    assert rc == 2 and "Pass exactly one of --in-place or --output-dir" in err


@pytest.mark.parametrize("where", ["--output-dir", "--in-place"])
def test_failed_verification_writes_nothing(tok_dir, tmp_path, capsys, monkeypatch, where):
    monkeypatch.setattr(tokenizer_edit_io, "verify_tokenizer_dir", lambda *a, **k: ["simulated"])
    before, tree_before = snapshot(tok_dir), snapshot(tmp_path)
    dest = [where, tmp_path / "out"] if where == "--output-dir" else [where]
    rc, _, err = run_cli(capsys, "--tokenizer-model", tok_dir, "--rename", "<|quad_start|>=<short>", *dest)
    assert rc == 1 and "failed verification" in err and "simulated" in err
    assert snapshot(tmp_path) == tree_before and snapshot(tok_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_dry_run_verifies_but_writes_nothing(tok_dir, tmp_path, capsys):
    before = snapshot(tmp_path)
    rc, out, err = run_cli(capsys, "--tokenizer-model", tok_dir, "--rename",
                           "<|quad_start|>=<short>:non-special", "--dry-run")
    assert rc == 0, err
    assert "dry run: would write special_tokens_map.json, tokenizer.json, tokenizer_config.json" in out
    assert snapshot(tmp_path) == before


def test_script_help_documents_the_rename_syntax():
    run = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert "OLD=NEW[:special|:non-special]" in run.stdout and "--in-place" in run.stdout


def test_renaming_a_vocab_role_token_warns_about_the_template(tok_dir, tmp_path, capsys):
    """<｜User｜> sits in model.vocab too (trained special) and the chat template names it."""
    from transformers import AutoTokenizer

    rc, out, err = run_cli(capsys, "--tokenizer-model", tok_dir, "--rename", "<｜User｜>=<｜Human｜>",
                           "--rename", "<|endoftext|>=<|pad|>", "--output-dir", tmp_path / "o")
    assert rc == 0, err
    assert "warning: the chat template still mentions the old name '<｜User｜>'" in out
    tok = AutoTokenizer.from_pretrained(tmp_path / "o")
    assert tok.pad_token == "<|pad|>"
    assert json.loads((tmp_path / "o" / "special_tokens_map.json").read_text())["pad_token"] == "<|pad|>"
    human = tok.convert_tokens_to_ids("<｜Human｜>")
    assert tok.encode("a<｜Human｜>b", add_special_tokens=False).count(human) == 1
    assert "<｜Human｜>" not in tok.decode([human], skip_special_tokens=True)  # still special
