"""``run_store`` callback: write each step's metrics, expert loads and routing statistics to a RunStore.

The store URL is the ``url`` argument, else ``$MOE_LAB_STORE_URL``, else ``<runs dir>/runs.db`` next to the
run directory (the file ``moe-lab dashboard --runs <runs dir>`` reads). Every step is one transaction.

Example:
    >>> from moe_lab.tracking.exporters.run_store import RunStoreCallback
    >>> cb = RunStoreCallback(url="sqlite://")   # train.callbacks: [run_store] in a config
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moe_lab.tracking.exporters._common import routing_layer_stats, run_identity, scalar_metrics
from moe_lab.tracking.store import ENV_URL, RunStore
from moe_lab.train.callbacks.base import Callback

__all__ = ["RunStoreCallback"]


class RunStoreCallback(Callback):
    """Log to a :class:`~moe_lab.tracking.store.RunStore`.

    Args:
        url: store URL (see the module docstring for the default).
        every: write every N-th step (evaluations and the last step are always written).
        routing_stats: also store token counts, mean router probabilities and per-layer statistics
            (router entropy, load variance, ...) computed from the step's routing decisions.
    """

    def __init__(self, url: str | None = None, every: int = 1, routing_stats: bool = True) -> None:
        if every < 1:
            raise ValueError(f"run_store: 'every' must be >= 1 (got {every})")
        self.url, self.every, self.routing_stats = url, every, routing_stats
        self.store: RunStore | None = None
        self.run_id: int | None = None
        self._routing: dict[int, tuple[Any, Any, Any]] = {}

    def on_train_begin(self, trainer: Any) -> None:
        ident = run_identity(trainer)
        url = self.url or os.environ.get(ENV_URL)
        if url is None:
            url = f"sqlite:///{(ident.runs_dir or Path('runs')).resolve() / 'runs.db'}"
        self.store = RunStore(url)
        self.run_id = self.store.create_run(
            ident.name,
            config=ident.config,
            run_dir=str(ident.run_dir.resolve()) if ident.run_dir is not None else None,
            status="running",
        )

    def _due(self, trainer: Any, step: int) -> bool:
        total = getattr(trainer, "total_steps", None)
        return step % self.every == 0 or step == total

    def on_routing(self, trainer: Any, step: int, routing: list[Any]) -> None:
        if self.routing_stats and routing and self._due(trainer, step):
            self._routing = {step: routing_layer_stats(routing)}

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        if self.store is None or self.run_id is None or not self._due(trainer, step):
            return
        counts, probs, layers = self._routing.pop(step, (None, None, None))
        self._routing.clear()
        loads = metrics.get("expert_load")
        routing = [(step, loads, counts, probs)] if loads else []
        self.store.write_batch(
            self.run_id,
            metrics=[(step, scalar_metrics(metrics))],
            routing=routing,
            layer_stats=[(step, layers)] if layers else [],
        )

    def on_eval_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        if self.store is not None and self.run_id is not None:
            split = str(metrics.get("split", "val"))
            self.store.log_eval(self.run_id, step, scalar_metrics(metrics), split=split)

    def on_train_end(self, trainer: Any, result: Any) -> None:
        if self.store is None or self.run_id is None:
            return
        to_dict = getattr(result, "to_dict", None)
        summary = to_dict() if callable(to_dict) else None
        status = "stopped" if getattr(result, "stopped_early", False) else "finished"
        self.store.finish_run(self.run_id, status=status, summary=summary)
        self.store.close()
