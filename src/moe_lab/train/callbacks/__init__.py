"""Training callbacks (one per file) and the name registry used by ``train.callbacks``.

Example:
    >>> from moe_lab.train.callbacks import Callback, CheckpointCallback, LoggingCallback
"""

from __future__ import annotations

from typing import Any

from moe_lab.train.callbacks.base import Callback
from moe_lab.train.callbacks.checkpointing import CheckpointCallback
from moe_lab.train.callbacks.early_stopping import EarlyStopping
from moe_lab.train.callbacks.logging import LoggingCallback
from moe_lab.train.callbacks.progress import ProgressCallback
from moe_lab.train.callbacks.registry import (
    available_callbacks,
    create_callback,
    register_callback,
    resolve_callbacks,
)

__all__ = [
    "Callback",
    "CheckpointCallback",
    "EarlyStopping",
    "LoggingCallback",
    "ProgressCallback",
    "available_callbacks",
    "create_callback",
    "default_callbacks",
    "register_callback",
    "resolve_callbacks",
]


def default_callbacks(trainer: Any) -> list[Callback]:
    """The built-in callbacks for a trainer: progress bar (terminals only) or log lines, metrics.jsonl
    and checkpoints when there is a run directory, early stopping when configured."""
    cfg = trainer.config
    progress = ProgressCallback(enabled=None if trainer.console else False)
    logging = LoggingCallback(console=trainer.console, step_lines=not progress.enabled)
    cbs: list[Callback] = [progress, logging]
    if trainer.run_dir is not None:
        cbs.append(CheckpointCallback(cfg.checkpoint_every, final=cfg.save_final_checkpoint))
    if cfg.early_stopping_patience:
        cbs.append(EarlyStopping(cfg.early_stopping_patience))
    return cbs
