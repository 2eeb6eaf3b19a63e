"""``mlflow`` callback: log params, metrics and expert loads to an MLflow tracking store.

The store is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a local SQLite file
``<runs dir>/mlflow.db`` (MLflow's file store is deprecated; SQLite needs ``alembic``, part of
``moe-lab[track]``). View it with ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``.
Uses an ``MlflowClient`` (no global active run), so several trainers in one process do not interfere.

Example:
    >>> from moe_lab.tracking.exporters.mlflow import MLflowCallback
    >>> cb = MLflowCallback(experiment="moe-lab")   # train.callbacks: [mlflow]
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from moe_lab.tracking.exporters._common import run_identity, scalar_metrics
from moe_lab.train.callbacks.base import Callback

__all__ = ["MLflowCallback", "flatten_params"]

_MAX_PARAM_LEN = 500


def flatten_params(config: dict[str, Any] | None, prefix: str = "") -> dict[str, str]:
    """``{"model.num_experts": "8", ...}`` from a nested config dict (values as short strings).

    >>> flatten_params({"model": {"num_experts": 8, "top_k": 2}})
    {'model.num_experts': '8', 'model.top_k': '2'}
    """
    out: dict[str, str] = {}
    for k, v in (config or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_params(v, key + "."))
        else:
            out[key] = str(v)[:_MAX_PARAM_LEN]
    return out


class MLflowCallback(Callback):
    """Log to MLflow.

    Args:
        tracking_uri: MLflow store URI (see the module docstring for the default).
        experiment: experiment name. every: log every N-th step.
        expert_loads: also log ``expert_load/L{layer}/E{expert}`` metrics.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "moe-lab",
        every: int = 1,
        expert_loads: bool = True,
    ) -> None:
        if every < 1:
            raise ValueError(f"mlflow: 'every' must be >= 1 (got {every})")
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.every, self.expert_loads = every, expert_loads
        self.client: Any = None
        self.run_id: str | None = None

    def on_train_begin(self, trainer: Any) -> None:
        from mlflow.tracking import MlflowClient

        ident = run_identity(trainer)
        base = (ident.runs_dir or Path("runs")).resolve()
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{base / 'mlflow.db'}"
        base.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            exp_id = self.client.create_experiment(
                self.experiment, artifact_location=(base / "mlartifacts").as_uri()
            )
        run = self.client.create_run(
            exp_id, run_name=ident.name, tags={"moe_lab.run_dir": str(ident.run_dir or "")}
        )
        self.run_id = run.info.run_id
        params = flatten_params(ident.config)
        if params:
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        if self.client is None or step % self.every:
            return
        values = scalar_metrics(metrics)
        if self.expert_loads:
            for layer, row in enumerate(metrics.get("expert_load") or []):
                for expert, load in enumerate(row):
                    values[f"expert_load/L{layer}/E{expert}"] = float(load)
        self._log(step, values)

    def on_eval_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        if self.client is not None:
            split = str(metrics.get("split", "val"))
            self._log(step, {f"{split}/{k}": v for k, v in scalar_metrics(metrics).items()})

    def on_train_end(self, trainer: Any, result: Any) -> None:
        if self.client is None or self.run_id is None:
            return
        status = "KILLED" if getattr(result, "stopped_early", False) else "FINISHED"
        self.client.set_terminated(self.run_id, status=status)
        self.client = None
