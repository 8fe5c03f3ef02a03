"""The error contract (docs/architecture.md): bad user input raises `UserError`.

The CLI catches it, prints ONE line (no traceback unless `--debug`) and exits with code 2.
Raise it with a message that names the file, row or field and says what to do.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


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


class TrainingDiverged(UserError):
    """The loss, a gradient norm or the weights became NaN/inf: the run stops and never looks finished
    (its DIR.partial is marked `diverged`). Raised by the transformers trainers and the explicit loops."""

    def __init__(self, step: int, what: str, value: Any = None, *, learning_rate: float | None = None,
                 desc: str = "training", unit: str = "step", total: int | None = None):
        self.step, self.what, self.value = step, what, value
        where = f"{unit} {step}" + (f" of {total}" if total else "")
        found = f"{what} is {value}" if value is not None else what
        rate = f" (learning rate {learning_rate:g})" if learning_rate is not None else ""
        super().__init__(f"{desc} diverged at {where}: {found}{rate}: lower the learning rate and start again "
                         "with --overwrite; no finished run was written")
