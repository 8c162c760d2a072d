"""A live view of a training subprocess for the demo, read from its ``--log-json`` file.

The trainer runs under ``torchrun`` with its console going to a log file (so the summary stays
readable and a failure can quote the log); the JSON log gets one line per iteration, which is
what a follower can parse without depending on the console format. In a terminal the view is one
line rewritten in place; otherwise (CI, ``| tee``) a line every ``every`` iterations, so a
non-interactive log still shows that the stage is alive.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, TextIO


def eta_seconds(done: int, total: int, seconds_since_first: float, first: int) -> Optional[float]:
    """Remaining seconds at the rate measured since the first logged iteration (start-up and the
    first iteration's warm-up excluded); ``None`` until two iterations have been seen.

    >>> eta_seconds(done=11, total=21, seconds_since_first=5.0, first=1)
    5.0
    >>> eta_seconds(done=1, total=21, seconds_since_first=0.0, first=1) is None
    True
    """
    if done <= first or seconds_since_first <= 0:
        return None
    return (total - done) * seconds_since_first / (done - first)


def format_duration(seconds: Optional[float]) -> str:
    """``"1m05s"``, ``"42s"``; ``"?"`` when unknown.

    >>> format_duration(65.2), format_duration(4.6), format_duration(None)
    ('1m05s', '5s', '?')
    """
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(label: str, iteration: int, total: int, loss: float,
                  eta: Optional[float]) -> str:
    """``"SFT training  120/400 [30%]  loss 0.512  ETA 1m10s"``."""
    pct = 100 * iteration // max(total, 1)
    return (f"{label}  {iteration:>{len(str(total))}}/{total} [{pct:3d}%]  loss {loss:.3f}  "
            f"ETA {format_duration(eta)}")


class LogFollower:
    """Reads the complete lines appended to a JSON-lines file since the last call (a line still
    being written is left for the next call)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._offset = 0
        self._partial = b""

    def new_records(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # not ours (or torn by a crash): the log shows it
                continue
        return out


def generation_lines(record: dict) -> list[str]:
    """What an evaluation's ``--eval-generate`` answers look like in the demo::

        iteration 100: 'Repeat: tiger piano lemon' -> 'tiger piano<|im_end|>'
    """
    out = []
    for g in record.get("generations") or []:
        prompt = g["prompt"]
        user = prompt.rsplit("user\n", 1)[-1].split("<|im_end|>")[0] if "user\n" in prompt \
            else prompt[-60:]
        out.append(f"iteration {record['iteration']}: {user!r} -> {g['completion']!r}")
    return out


class TrainingView:
    """Turns iteration records into a live line (``live=True``) or periodic lines."""

    def __init__(self, label: str, total: int, out: TextIO, live: bool, every: int = 20,
                 clock: Callable[[], float] = time.perf_counter):
        self.label, self.total, self.out, self.live = label, total, out, live
        self.every, self.clock = max(every, 1), clock
        self._first: Optional[tuple[int, float]] = None
        self._last_line = ""

    def update(self, records: list[dict]) -> None:
        for r in records:
            it, loss = r.get("iteration"), r.get("loss")
            if not isinstance(it, int) or not isinstance(loss, (int, float)):
                continue
            now = self.clock()
            if self._first is None:
                self._first = (it, now)
            eta = eta_seconds(it, self.total, now - self._first[1], self._first[0])
            line = progress_line(self.label, it, self.total, loss, eta)
            if self.live:
                pad = max(len(self._last_line) - len(line), 0)
                self.out.write("\r    " + line + " " * pad)
                self.out.flush()
            elif it % self.every == 0 or it == self.total:
                self.out.write("    " + line + "\n")
                self.out.flush()
            self._last_line = line
            answers = generation_lines(r)  # --eval-generate: what it answers now
            if answers:
                lead = "\n" if self.live else ""
                self.out.write(lead + "".join(f"    {a}\n" for a in answers))
                self.out.flush()
                if self.live:
                    self._last_line = ""

    def close(self) -> None:
        if self.live and self._last_line:
            self.out.write("\n")
            self.out.flush()
