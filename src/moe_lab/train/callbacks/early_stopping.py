"""Stop training when the validation loss has not improved for ``patience`` evaluations.

The counters live in :class:`moe_lab.train.state.TrainState` (saved in checkpoints), so a resumed run
keeps counting where it stopped.

Example:
    >>> from moe_lab.train.callbacks.early_stopping import EarlyStopping
    >>> EarlyStopping(patience=2).patience
    2
"""

from __future__ import annotations

from typing import Any

from moe_lab.train.callbacks.base import Callback

__all__ = ["EarlyStopping"]


class EarlyStopping(Callback):
    """``should_stop`` after ``patience`` evaluations in a row without a new best validation loss."""

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"early stopping patience must be >= 1, got {patience}")
        self.patience = patience
        self.stopped_at: int | None = None

    def should_stop(self, trainer: Any) -> bool:
        if trainer.state.evals_without_improvement >= self.patience:
            self.stopped_at = trainer.state.step
            return True
        return False
