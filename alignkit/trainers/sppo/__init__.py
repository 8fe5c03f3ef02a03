"""`alignkit sppo`: iterative SPPO (and iterative DPO / IPO) — config in `config`, the loop in `loop`, the
stages that write an iteration's files in `stages`. docs/algorithms/sppo.md."""

from alignkit.trainers.sppo.config import SPPOConfig
from alignkit.trainers.sppo.loop import run

__all__ = ["SPPOConfig", "run"]
