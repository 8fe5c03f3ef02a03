"""Experiment trackers for the explicit loops (ppo, sppo): every metrics row `Loop.log` writes to
metrics.jsonl also goes to the tracker chosen with `--report-to` (`output.report_to`). The TRL-based
trainers use transformers' own integrations instead (`trainers/_hf.report_to`).

TensorBoard writes into the run directory (DIR/tensorboard); wandb and trackio are imported only
when chosen. The CLI chooses the tracker once per command (`use`); a loop's rows reach it through
`log`; with none chosen (`none`, or a library caller) nothing happens.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from typing import Any

from alignkit.errors import UserError

TENSORBOARD_DIR = "tensorboard"
PROJECT = "alignkit"  # the wandb / trackio project every run logs under
# tracker -> (module that must be importable, pip package that provides it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio")}


def require(kind: str) -> None:
    """One line when the tracker's package is missing (checked before anything is loaded)."""
    if kind in PACKAGES and importlib.util.find_spec(PACKAGES[kind][0]) is None:
        raise UserError(f"--report-to {kind}: the {PACKAGES[kind][1]} package is not installed: "
                        f"pip install {PACKAGES[kind][1]} (or --report-to none)")


class Tracker:
    """Sends metrics rows of one run to a tracker; opened at the first row (the run directory exists then)."""

    def __init__(self, kind: str, project: str, config: dict[str, Any] | None = None):
        self.kind, self.project, self.config = kind, project, config or {}
        self.backend: Any = None
        self.run_dir: Any = None

    def _open(self, run: Any) -> None:
        """`run`: the `runs.RunDir` being written."""
        name = run.final.name
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.backend = SummaryWriter(log_dir=str(run.work / TENSORBOARD_DIR))
        else:  # wandb and trackio share init/log/finish
            self.backend = importlib.import_module(self.kind)
            self.backend.init(project=self.project, name=name, config=self.config)
        self.run_dir = run.final

    def log(self, run: Any, row: dict[str, Any]) -> None:
        """One metrics row (`step` and numbers; other values are left to metrics.jsonl)."""
        if self.backend is None or self.run_dir != run.final:
            self.close()
            self._open(run)
        step = int(row.get("step", 0))
        values = {k: float(v) for k, v in row.items()
                  if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        if self.kind == "tensorboard":
            for key, value in values.items():
                self.backend.add_scalar(key, value, step)
            self.backend.flush()
        else:
            self.backend.log(values, step=step)

    def close(self) -> None:
        if self.backend is None:
            return
        if self.kind == "tensorboard":
            self.backend.close()
        else:
            self.backend.finish()
        self.backend = None


_active: Tracker | None = None


def use(kind: str, project: str = PROJECT, config: dict[str, Any] | None = None) -> None:
    """Choose the tracker for the loops this process runs next (`none`: no tracker)."""
    global _active
    close()
    require(kind)
    _active = Tracker(kind, project, config) if kind != "none" else None


def log(run: Any, row: dict[str, Any]) -> None:
    """Send one metrics row of `run` to the chosen tracker, if any (the main rank only)."""
    if _active is not None and run.is_main:
        _active.log(run, row)


def close() -> None:
    """Flush and close the chosen tracker (the CLI calls it when the command ends)."""
    global _active
    if _active is not None:
        _active.close()
    _active = None
