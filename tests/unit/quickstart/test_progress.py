"""The demo's training view: ETA from the measured rate, complete lines only, live vs periodic."""

import io
import json

from megatron.sft.quickstart.progress import (
    LogFollower,
    TrainingView,
    eta_seconds,
    format_duration,
    generation_lines,
)


def test_eta_uses_the_rate_after_the_first_logged_iteration():
    # 10 iterations (1 -> 11) took 5 s: 0.5 s each, 10 left
    assert eta_seconds(done=11, total=21, seconds_since_first=5.0, first=1) == 5.0
    assert eta_seconds(done=1, total=21, seconds_since_first=0.0, first=1) is None
    assert format_duration(125) == "2m05s" and format_duration(59.4) == "59s"


def test_follower_returns_only_complete_new_lines(tmp_path):
    log = tmp_path / "log.jsonl"
    f = LogFollower(log)
    assert f.new_records() == []  # not written yet
    with open(log, "w") as out:
        out.write(json.dumps({"iteration": 1, "loss": 2.0}) + "\n" + '{"iteration": 2, "lo')
    assert f.new_records() == [{"iteration": 1, "loss": 2.0}]
    with open(log, "a") as out:
        out.write('ss": 1.5}\n')
    assert f.new_records() == [{"iteration": 2, "loss": 1.5}]
    assert f.new_records() == []


def _records(n):
    return [{"iteration": i, "loss": 1.0 / i} for i in range(1, n + 1)]


def test_view_prints_every_n_iterations_when_not_a_terminal():
    t = iter(range(100))
    out = io.StringIO()
    view = TrainingView("SFT", 10, out, live=False, every=4, clock=lambda: float(next(t)))
    view.update(_records(10))
    view.close()
    lines = out.getvalue().splitlines()
    # iterations 4, 8 and the last; one clock tick per iteration: 1 s each
    assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"]
    assert lines[0] == "    SFT   4/10 [ 40%]  loss 0.250  ETA 6s"
    assert lines[-1].endswith("[100%]  loss 0.100  ETA 0s")


def test_live_view_rewrites_one_line_and_ends_it():
    out = io.StringIO()
    view = TrainingView("LoRA", 3, out, live=True, clock=lambda: 0.0)
    view.update(_records(3) + [{"iteration": 4}])  # a record without a loss is skipped
    view.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert text.rstrip().endswith("LoRA  3/3 [100%]  loss 0.333  ETA ?")


def test_evaluations_answers_are_shown_under_the_progress():
    g = {"prompt": "<|im_start|>user\nRepeat: a b<|im_end|>\n<|im_start|>assistant\n",
         "completion": "a b<|im_end|>"}
    record = {"iteration": 2, "loss": 0.5, "generations": [g]}
    assert generation_lines(record) == ["iteration 2: 'Repeat: a b' -> 'a b<|im_end|>'"]
    out = io.StringIO()
    view = TrainingView("SFT", 3, out, live=True, clock=lambda: 0.0)
    view.update(_records(1) + [record] + _records(3)[2:])
    view.close()
    lines = out.getvalue().split("\n")
    # the live line is ended, the answer printed on its own line, then the live line goes on
    assert lines[1] == "    iteration 2: 'Repeat: a b' -> 'a b<|im_end|>'"
    assert lines[2].startswith("\r    SFT  3/3") and lines[-1] == ""
