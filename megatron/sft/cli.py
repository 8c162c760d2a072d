"""Shared behaviour of our command-line tools: user mistakes print one clear line, not a
traceback, Ctrl-C says that nothing was published, and a missing megatron-core or torch says
how to install it."""

from __future__ import annotations

import sys
from typing import Callable

#: errors that mean "bad input"; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, KeyError,
               FloatingPointError)

#: module a tool may lack -> how to get it (any other missing module is a bug: traceback)
INSTALL_HINTS = {
    "megatron.core": "megatron-core is not installed in {python}: run `bash "
                     "scripts/setup/install_requirements.sh` with this python (it checks torch "
                     "and adds megatron-core without replacing a container's torch)",
    "torch": "torch is not installed in {python}: use the NVIDIA PyTorch container (README, "
             "step 0) or, on a CPU-only machine, `pip install torch==2.13.0` (the CPU build that "
             "`make venv` uses), then `bash scripts/setup/install_requirements.sh`",
}


def run_cli(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except ModuleNotFoundError as e:
        if e.name not in INSTALL_HINTS:
            raise
        print("error: " + INSTALL_HINTS[e.name].format(python=sys.executable), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: partial output was removed, nothing was published", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        _tell_the_launcher(f"error: {msg}")
        sys.exit(2)
    sys.exit(code or 0)



def _tell_the_launcher(line: str) -> None:
    """Under torchrun, leave the one-line error in the worker's error file: torchrun's summary
    then names it, and ``tools/launch.py`` prints it as the last line (not torchrun's
    traceback)."""
    import json
    import os
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {
                "py_callstack": line, "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass
