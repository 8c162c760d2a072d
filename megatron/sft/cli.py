"""Shared behaviour of our command-line tools: user mistakes print one clear line, not a
traceback, and Ctrl-C says that nothing was published."""

from __future__ import annotations

import sys
from typing import Callable

#: errors that mean "bad input"; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, KeyError,
               FloatingPointError)


def run_cli(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted: partial output was removed, nothing was published", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)

