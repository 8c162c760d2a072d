"""A JSON line escaping an unpaired UTF-16 surrogate is a bad record (dropped and counted, or a
--strict stop), not a crash of the whole run."""

import json

import pytest

from megatron.sft.data.preprocess import PreprocessConfig, preprocess


def _write(path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    with open(path, "w") as f:
        f.write(json.dumps(good) + "\n")
        f.write('{"messages": [{"role": "user", "content": "x\\ud800y"}, '
                '{"role": "assistant", "content": "ok"}]}\n')
        f.write(json.dumps(good) + "\n")


def test_lone_surrogate_is_dropped_and_counted(tmp_path, tokenizer_dirs):
    _write(tmp_path / "d.jsonl")
    stats = preprocess(PreprocessConfig(input=str(tmp_path / "d.jsonl"),
                                        tokenizer_model=str(tokenizer_dirs["chatml"]),
                                        output_prefix=str(tmp_path / "out"), progress=False))
    assert stats.samples_written == 2 and stats.dropped["non_utf8"] == 1


def test_lone_surrogate_stops_a_strict_run(tmp_path, tokenizer_dirs):
    _write(tmp_path / "d.jsonl")
    with pytest.raises(Exception, match="unpaired surrogate U\\+D800"):
        preprocess(PreprocessConfig(input=str(tmp_path / "d.jsonl"),
                                    tokenizer_model=str(tokenizer_dirs["chatml"]),
                                    output_prefix=str(tmp_path / "out"), strict=True,
                                    progress=False))
    assert not list(tmp_path.glob("out*.bin"))
