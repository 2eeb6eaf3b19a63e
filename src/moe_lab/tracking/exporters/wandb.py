"""``wandb`` callback: log to Weights & Biases — offline by default, so it works without an account.

The mode is ``mode``, else ``$WANDB_MODE``, else ``offline``: runs land in ``<run dir>/wandb/offline-run-*``
and can be uploaded later with ``wandb sync``. Set ``WANDB_MODE=online`` (and log in) to stream them.

Example:
    >>> from moe_lab.tracking.exporters.wandb import WandbCallback
    >>> cb = WandbCallback(project="moe-lab")   # train.callbacks: [{name: wandb, project: moe-lab}]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import numpy as np

from moe_lab.tracking.exporters._common import run_identity, scalar_metrics
from moe_lab.train.callbacks.base import Callback

__all__ = ["WandbCallback"]

_MODES = ("offline", "online", "disabled", "shared")


class WandbCallback(Callback):
    """Log scalars, eval metrics and per-layer expert-load histograms to W&B.

    Args:
        project: W&B project. entity: team or user (None: the default one).
        mode: ``offline``, ``online`` or ``disabled`` (default: ``$WANDB_MODE`` or ``offline``).
        dir: where W&B writes its files (default: the run directory).
        every: log every N-th step. tags: run tags.
    """

    def __init__(
        self,
        project: str = "moe-lab",
        entity: str | None = None,
        mode: str | None = None,
        dir: str | None = None,
        every: int = 1,
        tags: list[str] | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"wandb: 'every' must be >= 1 (got {every})")
        self.project, self.entity, self.mode, self.dir = project, entity, mode, dir
        self.every, self.tags = every, tags
        self.run: Any = None

    def on_train_begin(self, trainer: Any) -> None:
        import wandb

        ident = run_identity(trainer)
        mode = self.mode or os.environ.get("WANDB_MODE") or "offline"
        if mode not in _MODES:
            raise ValueError(f"wandb: mode must be one of {', '.join(_MODES)} (got {mode!r})")
        directory = Path(self.dir) if self.dir else (ident.run_dir or Path("runs") / ident.name)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            name=ident.name,
            config=ident.config or {},
            dir=str(directory),
            mode=cast(Any, mode),
            tags=self.tags,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        if self.run is None or step % self.every:
            return
        import wandb

        data: dict[str, Any] = {f"train/{k}": v for k, v in scalar_metrics(metrics).items()}
        for layer, row in enumerate(metrics.get("expert_load") or []):
            if row:
                edges = np.arange(len(row) + 1, dtype=np.float64)  # one bin per expert
                data[f"expert_load/layer{layer}"] = wandb.Histogram(
                    np_histogram=(np.asarray(row, dtype=np.float64), edges)
                )
        self.run.log(data, step=step)

    def on_eval_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            split = str(metrics.get("split", "val"))
            self.run.log({f"{split}/{k}": v for k, v in scalar_metrics(metrics).items()}, step=step)

    def on_train_end(self, trainer: Any, result: Any) -> None:
        if self.run is None:
            return
        to_dict = getattr(result, "to_dict", None)
        if callable(to_dict):
            self.run.summary.update({k: v for k, v in to_dict().items() if isinstance(v, (int, float, str))})
        self.run.finish()
        self.run = None
