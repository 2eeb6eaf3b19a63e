"""The callback protocol of :class:`moe_lab.train.MoETrainer`. One callback per file in this folder.

Example:
    >>> from moe_lab.train.callbacks.base import Callback
    >>> class PrintLoss(Callback):
    ...     def on_step_end(self, trainer, step, metrics):
    ...         print(step, metrics["loss"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["Callback"]


class Callback:
    """Base class: override the hooks you need. ``trainer`` is the running :class:`MoETrainer`.

    ``metrics`` dicts hold plain Python numbers (and lists of numbers for per-layer expert loads), the same
    keys that are written to ``metrics.jsonl``. ``routing`` (when given) is the list of detached
    :class:`moe_lab.nn.router.RoutingDecision` of the step's last micro-batch, one per MoE layer.
    """

    def on_train_begin(self, trainer: Any) -> None:
        """Called once before the first step (also after a resume)."""

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        """Called after each optimizer step with that step's metrics."""

    def on_routing(self, trainer: Any, step: int, routing: list[Any]) -> None:
        """Called after each optimizer step with the step's routing decisions (detached)."""

    def on_eval_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        """Called after each evaluation with ``eval_loss``, ``perplexity`` ..."""

    def on_checkpoint(self, trainer: Any, step: int, path: Path) -> None:
        """Called after a checkpoint was written (atomically) to ``path``."""

    def on_train_end(self, trainer: Any, result: Any) -> None:
        """Called once at the end with the :class:`TrainingResult`."""

    def should_stop(self, trainer: Any) -> bool:
        """Return True to stop training early (checked after each step)."""
        return False
