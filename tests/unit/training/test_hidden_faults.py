"""Issue 30's silent faults, each reproduced as a user hit it and now a clear line (or a
warning that names the thing): another tokenizer of the same size, a dataset that lost a mask
file, a checkpoint without checksums, an --save-hf that cannot be written, an EP that does not
divide the experts."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from sft_testing import small_filesystem
from megatron.sft.data.validation import DataValidationError

SUFFIXES = ["_text_document.bin", "_text_document.idx", "_loss_mask_document.bin",
            "_loss_mask_document.idx", "_stats.json"]


def _copy_data(src, dst, suffixes=SUFFIXES):
    for suffix in suffixes:
        shutil.copy2(src + suffix, str(dst) + suffix)
    return str(dst)


# --- the data's tokenizer against the model's -------------------------------------------------
def _other_tokenizer_of_the_same_size(tok_dir: Path, out: Path) -> Path:
    """``tok_dir`` with the ids of two vocabulary entries swapped: same size, other tokens."""
    shutil.copytree(tok_dir, out)
    data = json.loads((out / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out / "tokenizer.json").write_text(json.dumps(data))
    return out


def test_the_fingerprint_survives_save_and_load_and_tells_tokenizers_apart(sft_assets, tmp_path):
    from transformers import AutoTokenizer

    from megatron.sft.data.preprocess import load_pretokenizer_tokenizer
    from megatron.sft.data.tokenizer_fingerprint import directory_fingerprint, \
        tokenizer_fingerprint

    tok = sft_assets["tokenizer"]
    mine = directory_fingerprint(tok)
    AutoTokenizer.from_pretrained(tok).save_pretrained(tmp_path / "resaved")
    assert directory_fingerprint(tmp_path / "resaved") == mine
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tok)) == mine
    assert tokenizer_fingerprint(load_pretokenizer_tokenizer(str(tok))) == mine
    other = _other_tokenizer_of_the_same_size(tok, tmp_path / "other")
    assert len(AutoTokenizer.from_pretrained(other)) == len(AutoTokenizer.from_pretrained(tok))
    assert directory_fingerprint(other) != mine
    stats = json.loads(Path(sft_assets["data"] + "_stats.json").read_text())
    assert stats["tokenizer_fingerprint"] == mine  # the pre-tokenizer records it
    assert directory_fingerprint(tmp_path) is None  # no tokenizer there: nothing to compare


def test_another_tokenizer_of_the_same_size_is_an_error_unless_allowed(sft_assets, tmp_path):
    """Was: --load HF_DIR holding tokenizer B, data tokenized with A of the same size: exit 0,
    and SAVE/hf_reference shipped B with every export."""
    from megatron.sft.training.run_guard import check_tokenizer

    hf = tmp_path / "hf"
    shutil.copytree(sft_assets["hf"], hf)
    stats = json.loads(Path(sft_assets["data"] + "_stats.json").read_text())

    def trainer(allow=False):
        return SimpleNamespace(cfg=SimpleNamespace(load=str(hf), allow_tokenizer_mismatch=allow),
                               source=SimpleNamespace(hf_load=True), meta=None)

    assert check_tokenizer(trainer(), stats, "DATA") == []  # no tokenizer in the HF dir
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(sft_assets["tokenizer"] / name, hf / name)
    assert check_tokenizer(trainer(), stats, "DATA") == []  # the same tokenizer
    _other_tokenizer_of_the_same_size(sft_assets["tokenizer"], tmp_path / "b")
    shutil.copy2(tmp_path / "b" / "tokenizer.json", hf / "tokenizer.json")
    with pytest.raises(DataValidationError) as err:
        check_tokenizer(trainer(), stats, "DATA")
    message = str(err.value)
    assert message.startswith(f"DATA was tokenized with {sft_assets['tokenizer']} (tokenizer "
                              f"{stats['tokenizer_fingerprint']}), but the model's tokenizer in "
                              f"{hf} is another one (sha256:")
    assert "exports would ship" in message and "--allow-tokenizer-mismatch" in message
    warning = check_tokenizer(trainer(allow=True), stats, "DATA")
    assert len(warning) == 1 and warning[0].endswith("(--allow-tokenizer-mismatch)")


# --- a dataset that lost a file ---------------------------------------------------------------
@pytest.mark.parametrize("lost", ["_loss_mask_document.idx", "_loss_mask_document.bin",
                                  "_text_document.idx"])
def test_a_dataset_missing_one_file_is_an_error_naming_it(sft_assets, tmp_path, lost):
    """Was: _loss_mask_document.idx gone (its .bin there) trained on every token, exit 0; the
    inspect tool meanwhile printed '23.6% learned' and 'every token is learned'."""
    from megatron.sft.data.indexed_reader import open_indexed_pair
    from megatron.sft.data.sft_dataset import SFTDatasetConfig, build_sft_datasets

    data = _copy_data(sft_assets["data"], tmp_path / "ds",
                      [s for s in SUFFIXES if s != lost])
    present = lost[:-4] + (".bin" if lost.endswith(".idx") else ".idx")
    expected = f"{data}{lost} is missing, but {data}{present} is there"
    with pytest.raises(FileNotFoundError, match=expected):
        build_sft_datasets(SFTDatasetConfig(data_path=data, seq_length=128))
    with pytest.raises(FileNotFoundError, match=expected):  # the inspect tool's reader agrees
        open_indexed_pair(data)


def test_masks_lost_with_the_stats_kept_is_an_error_and_text_only_data_trains(sft_assets,
                                                                             tmp_path):
    from megatron.sft.data.indexed_reader import open_indexed_pair
    from megatron.sft.data.sft_dataset import SFTDatasetConfig, build_sft_datasets

    data = _copy_data(sft_assets["data"], tmp_path / "ds", SUFFIXES[:2] + SUFFIXES[4:])
    with pytest.raises(FileNotFoundError, match=rf"{data}_loss_mask_document.bin/.idx are "
                                                rf"missing, but {data}_stats.json is there"):
        build_sft_datasets(SFTDatasetConfig(data_path=data, seq_length=128))
    Path(data + "_stats.json").unlink()  # text only, as Megatron-LM's preprocess_data writes
    train, _, _ = build_sft_datasets(SFTDatasetConfig(data_path=data, seq_length=128))
    assert train.pretraining and open_indexed_pair(data)[1] is None


# --- a checkpoint iteration without checksums.json --------------------------------------------
def test_an_iteration_without_checksums_warns_or_fails_with_strict(tmp_path):
    """Was: resumed and exported unverified, with no notice."""
    from megatron.sft.training.model_source import ModelSource

    (tmp_path / "iter_0000003").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3\n")
    cfg = SimpleNamespace(load=str(tmp_path), verify=True, strict=False)
    notes = ModelSource(cfg)._unverified_notes()
    assert notes == [f"warning: {tmp_path}/iter_0000003 has no checksums.json (written before "
                     "checksums existed, or the file was lost): its files are read unverified, "
                     "so damaged bytes would go unnoticed; --strict makes this an error"]
    cfg.strict = True
    with pytest.raises(ValueError, match="--strict makes this an error: load an iteration"):
        ModelSource(cfg)._unverified_notes()
    cfg.verify = False  # --no-verify asked for no check
    assert ModelSource(cfg)._unverified_notes() == []
    (tmp_path / "iter_0000003" / "checksums.json").write_text("{}")
    cfg.verify, cfg.strict = True, True
    assert ModelSource(cfg)._unverified_notes() == []


# --- --save-hf / --save-hf-adapter that cannot be written -------------------------------------
def _hf_cfg(tmp_path, **extra):
    return SimpleNamespace(**{"load": str(tmp_path / "hf"), "save": str(tmp_path / "run"),
                              "save_hf": None, "save_hf_adapter": None, **extra})


def test_save_hf_into_a_file_or_a_place_without_files_fails_at_start(tmp_path):
    """Was: found only after training and saving: 'error: [Errno 17] File exists', 'error:
    [Errno 2] .../proc/x.lock', or a PermissionError traceback from publish_directory."""
    from megatron.sft.runtime.locks import NotWritableError
    from megatron.sft.training.hf_output import check_hf_outputs

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NotWritableError) as err:
        check_hf_outputs(_hf_cfg(tmp_path, save_hf=str(tmp_path / "notes.txt" / "out")))
    assert str(err.value) == (f"--save-hf {tmp_path}/notes.txt/out: {tmp_path}/notes.txt is a "
                              "file, not a directory, so nothing can be written under it; "
                              "choose another --save-hf")
    with pytest.raises(NotWritableError, match=rf"^--save-hf {tmp_path}/notes.txt: "
                                               rf"{tmp_path}/notes.txt is a file, not a "):
        check_hf_outputs(_hf_cfg(tmp_path, save_hf=str(tmp_path / "notes.txt")))
    with pytest.raises(NotWritableError, match=r"^--save-hf-adapter /proc/x: cannot write in "
                                               r"/proc \(the filesystem takes no new files\)"):
        check_hf_outputs(_hf_cfg(tmp_path, save_hf_adapter="/proc/x"))
    check_hf_outputs(_hf_cfg(tmp_path, save_hf=str(tmp_path / "new" / "out")))  # fine
    assert not list(tmp_path.glob("new/*"))  # the probe leaves no lock file behind


def test_save_hf_on_a_read_only_filesystem_fails_at_start_as_save_does(tmp_path):
    from megatron.sft.runtime.locks import NotWritableError, unwritable_reason
    from megatron.sft.training.hf_output import check_hf_outputs

    with small_filesystem(tmp_path / "ro", "1M", options="ro") as ro:
        with pytest.raises(NotWritableError) as err:
            check_hf_outputs(_hf_cfg(tmp_path, save_hf=str(ro / "deep" / "out")))
        assert str(err.value) == (f"--save-hf {ro}/deep/out: cannot write in {ro} (a read-only "
                                  "filesystem); choose a directory you can write to as "
                                  "--save-hf, or fix that one")
        # --save's start-up lock says it the same way (training/run_guard.acquire_run_lock)
        try:
            (ro / "x").mkdir()
        except OSError as exc:
            assert unwritable_reason("--save", ro / "x", exc).startswith(
                f"--save {ro}/x: cannot write in {ro} (a read-only filesystem)")


# --- an EP size that does not divide the experts ----------------------------------------------
def test_the_ep_error_lists_valid_ep_sizes():
    """Was: listed the valid TP and PP sizes only."""
    import dataclasses

    from megatron.sft.bridge.architectures import get_architecture
    from megatron.sft.bridge.model_shape import MoEShape
    from megatron.sft.runtime.layout import LayoutError, ParallelLayout

    shape = get_architecture("LlamaForCausalLM").shape(dict(
        architectures=["LlamaForCausalLM"], num_hidden_layers=4, hidden_size=64,
        intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    shape = dataclasses.replace(shape, moe=MoEShape(num_experts=6, top_k=2, ffn_hidden_size=30,
                                                    layers=(0, 1, 2, 3)))
    with pytest.raises(LayoutError, match=r"EP=4 does not divide num_experts=6.*valid EP sizes: "
                                          r"\[1, 2, 3, 6\]"):
        ParallelLayout(1, 1, ep=4).validate(shape)
