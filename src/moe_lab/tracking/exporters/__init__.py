"""Trainer callbacks that export metrics and routing statistics, one per file.

- :class:`RunStoreCallback` (``run_store``): the SQL run store the dashboard reads.
- :class:`TensorBoardCallback` (``tensorboard``): scalars, expert-load histograms and heatmap images.
- :class:`WandbCallback` (``wandb``): Weights & Biases, offline unless told otherwise.
- :class:`MLflowCallback` (``mlflow``): an MLflow tracking store (local SQLite by default).

Classes load lazily, so importing this package does not import tensorboard, wandb or mlflow.
Use them by name in ``train.callbacks`` (``[run_store, {name: tensorboard, log_dir: tb}]``).

Example:
    >>> from moe_lab.tracking.exporters import EXPORTERS
    >>> sorted(EXPORTERS)
    ['mlflow', 'run_store', 'tensorboard', 'wandb']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from moe_lab.tracking.exporters.mlflow import MLflowCallback
    from moe_lab.tracking.exporters.run_store import RunStoreCallback
    from moe_lab.tracking.exporters.tensorboard import TensorBoardCallback
    from moe_lab.tracking.exporters.wandb import WandbCallback

__all__ = ["EXPORTERS", "MLflowCallback", "RunStoreCallback", "TensorBoardCallback", "WandbCallback"]

# registry name -> "module:attribute" (the form moe_lab.train.callbacks.registry takes)
EXPORTERS: dict[str, str] = {
    "run_store": "moe_lab.tracking.exporters.run_store:RunStoreCallback",
    "tensorboard": "moe_lab.tracking.exporters.tensorboard:TensorBoardCallback",
    "wandb": "moe_lab.tracking.exporters.wandb:WandbCallback",
    "mlflow": "moe_lab.tracking.exporters.mlflow:MLflowCallback",
}
_BY_CLASS = {path.partition(":")[2]: path.partition(":")[0] for path in EXPORTERS.values()}


def __getattr__(name: str) -> Any:
    module = _BY_CLASS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
