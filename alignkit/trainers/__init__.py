"""Trainer table: command name -> where its config class and run function live. A plain dict, the only
registry.

The entries are names, imported on use (`load`), so that reading the table (`alignkit --help`,
`recipes validate`, `run --dry-run`) imports neither torch nor the quickstart.
"""

from __future__ import annotations

import importlib
from typing import Any

# command -> (module, config class, run function)
TRAINERS: dict[str, tuple[str, str, str]] = {
    "quickstart": ("alignkit.quickstart", "QuickstartConfig", "run"),
    "sft": ("alignkit.trainers.sft", "SFTConfig", "run"),
    "rm": ("alignkit.trainers.reward", "RMConfig", "run"),
    "rm-ensemble": ("alignkit.trainers.reward", "RMEnsembleConfig", "run_ensemble"),
    "dpo": ("alignkit.trainers.preference", "DPOConfig", "run"),
    "kto": ("alignkit.trainers.preference", "KTOConfig", "run_kto"),
    "ppo": ("alignkit.trainers.ppo", "PPOConfig", "run"),
    "sppo": ("alignkit.trainers.sppo", "SPPOConfig", "run"),
}


def config_class(command: str) -> Any:
    """The config class of `command` (imports its module, not the libraries its run function needs)."""
    module, cls, _ = TRAINERS[command]
    return getattr(importlib.import_module(module), cls)


def load(command: str) -> tuple[Any, Any]:
    """(config class, run function) of `command`."""
    module, cls, fn = TRAINERS[command]
    mod = importlib.import_module(module)
    return getattr(mod, cls), getattr(mod, fn)
