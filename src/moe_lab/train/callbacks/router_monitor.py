"""RouterMonitorCallback: write per-step routing statistics to ``RUN_DIR/routing.jsonl``.

One JSON line per logged step: ``{"step": s, "layers": [LayerStats dict, ...]}`` (fields and definitions in
:mod:`moe_lab.analytics.stats`: load fractions, counts, cv, max/mean, entropy and entropy / log E, drop rate,
capacity utilisation), plus the ``[E, E]`` co-selection matrix every ``co_selection_every`` steps.
Only counts are computed (one small device->host copy per layer and step), so the overhead stays small.

Example:
    >>> from moe_lab.train.callbacks.router_monitor import RouterMonitorCallback
    >>> cb = RouterMonitorCallback(every=1, co_selection_every=50)
    >>> # MoETrainer(model, cfg, run_dir="runs/demo", callbacks=[cb]).fit(data); cb.get_stats().mean_cv
    >>> # or in YAML: train.callbacks: [{name: router_monitor, co_selection_every: 100}]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from moe_lab.analytics.stats import RouterStats, RoutingCounts
from moe_lab.config import atomic_write_text
from moe_lab.train.callbacks.base import Callback

__all__ = ["RouterMonitorCallback"]


class RouterMonitorCallback(Callback):
    """Routing statistics of every ``every``-th step to ``routing.jsonl`` (and totals in memory).

    Args:
        every: log every N-th optimizer step (totals still include every step).
        co_selection_every: add the co-selection matrix every N-th step (0 = never).
        filename: file name inside the run directory.
        path: write here instead (e.g. when the trainer has no run directory); None and no run dir = memory only.
    """

    def __init__(
        self,
        every: int = 1,
        co_selection_every: int = 50,
        filename: str = "routing.jsonl",
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if co_selection_every < 0:
            raise ValueError(f"co_selection_every must be >= 0, got {co_selection_every}")
        self.every = every
        self.co_selection_every = co_selection_every
        self.filename = filename
        self.path: Path | None = Path(path) if path is not None else None
        self.totals: list[RoutingCounts] = []
        self.last: RouterStats | None = None
        self._fh: IO[str] | None = None
        self._names: list[str] = []

    def _open(self, trainer: Any) -> None:
        if self.path is None:
            run_dir = getattr(trainer, "run_dir", None)
            if run_dir is None:
                return
            self.path = Path(getattr(run_dir, "path", run_dir)) / self.filename
        step = int(getattr(getattr(trainer, "state", None), "step", 0) or 0)
        if self.path.exists() and step > 0:  # resume: forget lines logged after the checkpoint
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= step:
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                    continue
            atomic_write_text(self.path, "".join(f"{x}\n" for x in kept))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in on_train_end

    def on_train_begin(self, trainer: Any) -> None:
        if not getattr(trainer, "is_main_process", True):
            return
        model = getattr(trainer, "model", None)
        layers = model.moe_layers() if model is not None and hasattr(model, "moe_layers") else []
        names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
        self._names = [names.get(id(m), f"layer{i}") for i, m in enumerate(layers)]
        self._open(trainer)

    def on_routing(self, trainer: Any, step: int, routing: list[Any]) -> None:
        if not routing or not getattr(trainer, "is_main_process", True):
            return
        log = step % self.every == 0
        with_co = log and self.co_selection_every > 0 and step % self.co_selection_every == 0
        if not self.totals:
            self.totals = [RoutingCounts(num_experts=d.num_experts) for d in routing]
        names = (
            self._names if len(self._names) == len(routing) else [f"layer{i}" for i in range(len(routing))]
        )
        layer_stats = []
        for i, d in enumerate(routing):
            counts = RoutingCounts(num_experts=d.num_experts).add(d, with_co_selection=with_co)
            co, counts.co_selection = counts.co_selection, None
            self.totals[i] = self.totals[i].merge(counts)
            if log:
                counts.co_selection = co
                layer_stats.append(counts.to_layer_stats(i, names[i]))
        if not log:
            return
        self.last = RouterStats(layers=layer_stats, step=step)
        if self._fh is not None:
            record = self.last.to_dict()
            for s in record["layers"]:
                if s.get("co_selection") is None:
                    s.pop("co_selection", None)
            self._fh.write(json.dumps(record, allow_nan=False) + "\n")
            self._fh.flush()
        extra = getattr(trainer, "summary_extra", None)
        if isinstance(extra, dict):
            extra["routing"] = {
                "mean_cv": self.last.mean_cv,
                "mean_entropy_normalized": self.last.mean_entropy_normalized,
                "drop_rate": self.last.drop_rate,
            }

    def get_stats(self) -> RouterStats:
        """Totals over every step seen so far."""
        names = (
            self._names
            if len(self._names) == len(self.totals)
            else [f"layer{i}" for i in range(len(self.totals))]
        )
        step = self.last.step if self.last is not None else None
        return RouterStats(
            layers=[c.to_layer_stats(i, names[i]) for i, c in enumerate(self.totals)], step=step
        )

    def on_train_end(self, trainer: Any, result: Any) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
