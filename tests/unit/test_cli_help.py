"""Every flag of every command-line tool says what it does in ``--help``.

Each tool builds its parser inside ``main``/``parse_args``; the test stops ``parse_args`` there
and reads the parser, so no tool runs.
"""

import argparse
import importlib.util
import inspect
import sys

import pytest

from sft_testing import REPO

TOOLS = sorted(str(p.relative_to(REPO)) for pattern in ("tools/*.py", "scripts/*/*.py",
                                                        "benchmarks/*.py")
               for p in REPO.glob(pattern) if "argparse" in p.read_text())


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser_of(path, monkeypatch) -> argparse.ArgumentParser:
    def stop(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", stop)
    spec = importlib.util.spec_from_file_location(f"cli_{path.replace('/', '_')}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    for name in ("build_parser", "parse_args", "main"):
        fn = getattr(module, name, None)
        if fn is None:
            continue
        try:
            result = fn([]) if inspect.signature(fn).parameters else fn()
        except _Parsed as e:
            return e.parser
        if isinstance(result, argparse.ArgumentParser):
            return result
    raise AssertionError(f"{path}: no build_parser/parse_args/main that builds a parser")


@pytest.mark.parametrize("path", TOOLS)
def test_every_flag_has_help(path, monkeypatch):
    parser = _parser_of(path, monkeypatch)
    silent = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
              if a.help in (None, "") and not isinstance(a, argparse._HelpAction)]
    assert not silent, f"{path}: flags without help text: {silent}"
