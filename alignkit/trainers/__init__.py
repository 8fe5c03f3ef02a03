"""Trainer table: command name -> (config class, run function). A plain dict, the only registry."""

from __future__ import annotations

from alignkit import quickstart
from alignkit.trainers import sft

TRAINERS = {
    "quickstart": (quickstart.QuickstartConfig, quickstart.run),
    "sft": (sft.SFTConfig, sft.run),
}
