"""Run tracking: the SQL run store, importing run directories into it, and experiment-tracker exporters.

- :class:`RunStore` — runs, metrics, eval metrics and per-expert routing loads in SQLite or PostgreSQL.
- :func:`sync_run_dir` / :func:`sync_runs_dir` — import ``metrics.jsonl`` of run directories, incrementally.
- :mod:`moe_lab.tracking.exporters` — trainer callbacks: ``run_store``, ``tensorboard``, ``wandb``, ``mlflow``.

Example:
    >>> from moe_lab.tracking import RunStore
    >>> store = RunStore("sqlite://")
    >>> store.create_run("demo")
    1
"""

from __future__ import annotations

from moe_lab.tracking.ingest import SyncResult, sync_run_dir, sync_runs_dir
from moe_lab.tracking.store import (
    IngestState,
    RoutingHistory,
    RunRecord,
    RunStore,
    StoreError,
    redact_url,
    resolve_url,
)

__all__ = [
    "IngestState",
    "RoutingHistory",
    "RunRecord",
    "RunStore",
    "StoreError",
    "SyncResult",
    "redact_url",
    "resolve_url",
    "sync_run_dir",
    "sync_runs_dir",
]
