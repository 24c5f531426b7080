"""What the command-line scripts in scripts/ share when run from a shell."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


def run_from_shell(main: Callable[[], object], script: str) -> None:
    """Run a script's `main()` for a shell: a ValueError (bad input, whose message says what to change) ends the process
    with the one line `<script name>: error: <message>` and status 1, rather than a traceback that would only bury
    the message. `script` is the script's path (its `__file__`)."""
    try:
        main()
    except ValueError as err:
        sys.exit(f"{Path(script).name}: error: {err}")


__all__ = ["run_from_shell"]
