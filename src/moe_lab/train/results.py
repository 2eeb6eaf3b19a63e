"""Result records returned by :class:`moe_lab.train.MoETrainer`.

Example:
    >>> EvalResult(loss=2.0, perplexity=7.389, tokens=100).loss
    2.0
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["EvalResult", "TrainingResult"]


@dataclass
class EvalResult:
    """Mean next-token cross-entropy (nats/token) over ``tokens`` targets and its exponential."""

    loss: float
    perplexity: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingResult:
    """What :meth:`MoETrainer.train` returns (also written to ``summary.json``)."""

    final_loss: float | None
    """Training loss (lm + aux + z) of the last step."""
    final_lm_loss: float | None
    """Language-model loss of the last step."""
    eval_loss: float | None
    """Validation loss of the final evaluation (None without validation data)."""
    perplexity: float | None
    """exp(eval_loss)."""
    steps: int
    """Optimizer steps done in total (including before a resume)."""
    tokens: int
    """Training tokens consumed in total."""
    tokens_per_s: float
    """Training throughput of this session (tokens / time in steps)."""
    wall_time_s: float
    """Wall time of this ``train()`` call."""
    run_dir: str | None
    """The run directory, or None when training in memory."""
    stopped_early: bool = False
    """True when a callback (early stopping) ended training."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More numbers (unigram baseline, ...)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
