"""The error contract (docs/architecture.md): bad user input raises `UserError`.

The CLI catches it, prints ONE line (no traceback unless `--debug`) and exits with code 2.
Raise it with a message that names the file, row or field and says what to do.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user: a malformed file, a missing column, a value out of range, ..."""

    exit_code = 2


def closest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the closest valid name, or '' when nothing is close."""
    choices = list(choices)
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if not match:  # short names: "rank" -> "r", "lr" -> "learning_rate" style prefixes
        match = [c for c in choices if name.startswith(c) or c.startswith(name)][:1]
    return f' (did you mean "{match[0]}"?)' if match else ""
