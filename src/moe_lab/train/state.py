"""Mutable progress of a training run, saved as ``trainer_state.json`` in every checkpoint.

Example:
    >>> from moe_lab.train.state import TrainState
    >>> s = TrainState(step=3, tokens_seen=96)
    >>> TrainState.from_dict(s.to_dict()) == s
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """Counters of the loop; everything else needed to resume lives in the checkpoint files."""

    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Training tokens consumed (all micro-batches)."""
    epoch: int = 0
    """Current pass over the training set."""
    best_eval_loss: float | None = None
    """Lowest validation loss so far."""
    evals_without_improvement: int = 0
    """Consecutive evaluations that did not improve ``best_eval_loss`` (early stopping)."""
    train_time_s: float = 0.0
    """Wall time spent in training steps so far (resumes add to it)."""
    last_loss: float | None = None
    """Loss of the last optimizer step."""
    last_eval: dict[str, float] = field(default_factory=dict)
    """Metrics of the last evaluation (``eval_loss``, ``perplexity``)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite floats become None)."""
        out = asdict(self)
        for key in ("best_eval_loss", "last_loss"):
            value = out[key]
            if value is not None and not math.isfinite(value):
                out[key] = None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (forward compatibility)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
