"""Trainer table: command name -> (config class, run function). A plain dict, the only registry."""

from __future__ import annotations

from alignkit.trainers import sft

TRAINERS = {
    "sft": (sft.SFTConfig, sft.run),
}
