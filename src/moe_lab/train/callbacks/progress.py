"""A rich progress bar: step, loss, tokens/s and ETA. Silent when stdout is not a terminal.

Example:
    >>> from moe_lab.train.callbacks.progress import ProgressCallback
    >>> ProgressCallback(enabled=False).active
    False
"""

from __future__ import annotations

import sys
from typing import Any

from moe_lab.train.callbacks.base import Callback

__all__ = ["ProgressCallback"]


class ProgressCallback(Callback):
    """Live bar while training; ``enabled=None`` = only when stdout is a terminal."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stdout.isatty() if enabled is None else enabled
        self._progress: Any = None
        self._task: Any = None

    @property
    def active(self) -> bool:
        return self._progress is not None

    def on_train_begin(self, trainer: Any) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} tok/s"),
            TextColumn("eta"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=trainer.total_steps, completed=trainer.state.step, loss="-", rate="-"
        )

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        if self._progress is None:
            return
        rate = metrics["tokens_per_s"]
        self._progress.update(
            self._task,
            completed=step,
            loss=f"{metrics['loss']:.4f}",
            rate=f"{rate / 1000:.1f}k" if rate >= 1000 else f"{rate:.0f}",
        )

    def on_train_end(self, trainer: Any, result: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
