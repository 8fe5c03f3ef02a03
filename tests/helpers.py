"""Small test utilities shared by the trainer tests (imported as `from helpers import ...`)."""

from __future__ import annotations

from transformers import TrainerCallback


class Interrupt(TrainerCallback):
    """Raises KeyboardInterrupt (what Ctrl-C does) at the end of optimiser step `at`."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt
