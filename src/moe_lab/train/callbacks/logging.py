"""Metrics to ``metrics.jsonl`` (every step and every evaluation) and short console lines.

Example:
    >>> from moe_lab.train.callbacks.logging import LoggingCallback, format_step
    >>> format_step({"step": 5, "loss": 2.5, "lm_loss": 2.49, "aux_loss": 0.01, "lr": 1e-3,
    ...              "tokens_per_s": 1234.0}, total=10)
    'step 5/10 | loss 2.5000 | lm 2.4900 | aux 0.0100 | lr 1.00e-03 | 1.2k tok/s'
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from moe_lab.train.callbacks.base import Callback
from moe_lab.train.rundir import MetricsWriter

__all__ = ["LoggingCallback", "format_step"]

# Per-step bookkeeping keys not written to metrics.jsonl.
_PRIVATE = ("step_tokens",)


def _rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def format_step(m: dict[str, Any], total: int | None = None) -> str:
    """One console line for a step's metrics."""
    step = f"{m['step']}/{total}" if total else str(m["step"])
    return (
        f"step {step} | loss {m['loss']:.4f} | lm {m['lm_loss']:.4f} | aux {m['aux_loss']:.4f} | "
        f"lr {m['lr']:.2e} | {_rate(m['tokens_per_s'])} tok/s"
    )


class LoggingCallback(Callback):
    """Write every step's and evaluation's metrics to the run's ``metrics.jsonl``; print a line every
    ``log_every`` steps (``step_lines``) and after every evaluation when ``console`` is on."""

    def __init__(
        self,
        *,
        console: bool = True,
        step_lines: bool = True,
        log_every: int | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.console = console
        self.step_lines = step_lines
        self.log_every = log_every
        self.stream = stream
        self.writer: MetricsWriter | None = None

    def _print(self, text: str) -> None:
        if self.console:
            print(text, file=self.stream or sys.stdout, flush=True)

    def on_train_begin(self, trainer: Any) -> None:
        if trainer.run_dir is not None:
            resumed = getattr(trainer, "resumed_from", None) is not None
            self.writer = MetricsWriter(
                trainer.run_dir.metrics_path, truncate_after_step=trainer.state.step if resumed else None
            )
        if self.log_every is None:
            self.log_every = trainer.config.log_every

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write({k: v for k, v in metrics.items() if k not in _PRIVATE})
        every = self.log_every or 1
        if self.step_lines and (step % every == 0 or step == trainer.total_steps):
            self._print(format_step(metrics, trainer.total_steps))

    def on_eval_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(metrics)
        self._print(
            f"eval step {step} | val loss {metrics['eval_loss']:.4f} | ppl {metrics['perplexity']:.2f}"
        )

    def on_train_end(self, trainer: Any, result: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
