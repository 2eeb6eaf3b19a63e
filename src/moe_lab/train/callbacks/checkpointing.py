"""Write checkpoints every N steps and at the end (atomic, keep the last K).

Example:
    >>> from moe_lab.train.callbacks.checkpointing import CheckpointCallback
    >>> CheckpointCallback(every=100).every
    100
"""

from __future__ import annotations

from typing import Any

from moe_lab.train.callbacks.base import Callback

__all__ = ["CheckpointCallback"]


class CheckpointCallback(Callback):
    """Call ``trainer.save_checkpoint()`` every ``every`` steps (0 = never) and, with ``final``, at the
    end of training (unless the last step was just saved)."""

    def __init__(self, every: int = 0, *, final: bool = True) -> None:
        self.every = every
        self.final = final
        self.last_saved: int | None = None

    def on_train_begin(self, trainer: Any) -> None:
        if getattr(trainer, "resumed_from", None) is not None:
            self.last_saved = trainer.state.step  # that step is already on disk

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        if self.every and step % self.every == 0:
            trainer.save_checkpoint()
            self.last_saved = step

    def on_train_end(self, trainer: Any, result: Any) -> None:
        if self.final and self.last_saved != trainer.state.step and trainer.state.step > 0:
            trainer.save_checkpoint()
            self.last_saved = trainer.state.step
