"""What the dashboard routes call: keeps the run store in sync with the runs directory and shapes data.

One :class:`DashboardService` lives on ``app.state.service`` (made by :func:`moe_lab.dashboard.create_app`).
Problems found while importing run directories (a half-written last line, corrupt JSON, a bad config) are
kept per run and returned with every answer about that run, so the page can show them.

Example:
    >>> from moe_lab.dashboard.service import DashboardService
    >>> from moe_lab.dashboard.settings import DashboardSettings
    >>> svc = DashboardService(DashboardSettings(store_url="sqlite://"))
    >>> svc.list_runs()["runs"]
    []
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

from moe_lab.dashboard.settings import DashboardSettings
from moe_lab.tracking import RoutingHistory, RunRecord, RunStore, sync_runs_dir

__all__ = ["DashboardService", "layer_records", "subsample"]

LOSS_KEYS = ("loss", "lm_loss", "aux_loss", "z_loss")


def subsample(n: int, max_points: int) -> list[int]:
    """Indices of at most ``max_points`` evenly spaced items of ``n``, always keeping the last one."""
    if n <= max_points:
        return list(range(n))
    stride = math.ceil(n / max_points)
    idx = list(range(0, n, stride))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return idx


def _load_stats(fractions: list[float]) -> dict[str, float]:
    """Load variance, coefficient of variation and normalised entropy of one layer's load fractions."""
    n = len(fractions)
    if n == 0:
        return {}
    mean = sum(fractions) / n
    var = sum((f - mean) ** 2 for f in fractions) / n
    total = sum(fractions)
    ent = -sum((f / total) * math.log(f / total) for f in fractions if f > 0) if total > 0 else 0.0
    return {
        "load_variance": var,
        "cv": math.sqrt(var) / mean if mean > 0 else 0.0,
        "load_entropy_normalized": ent / math.log(n) if n > 1 else 0.0,
    }


def layer_records(
    hist: RoutingHistory, layer_stats: list[tuple[int, list[dict[str, float | None]]]]
) -> list[dict[str, Any]]:
    """``routing.jsonl``-style records ``{"step", "layers": [{"load_fractions", "cv", ...}]}`` (the input of
    :mod:`moe_lab.analytics.plots`), from stored loads plus any stored per-layer statistics."""
    stats = dict(layer_stats)
    out = []
    steps = sorted(set(hist.steps) | set(stats))
    loads_at = dict(zip(hist.steps, hist.load))
    for step in steps:
        loads = loads_at.get(step, [])
        extra = stats.get(step, [])
        layers = []
        for i in range(max(len(loads), len(extra))):
            rec: dict[str, Any] = {"layer": i}
            if i < len(loads):
                rec["load_fractions"] = loads[i]
                rec.update(_load_stats(loads[i]))
            if i < len(extra):
                rec.update({k: v for k, v in extra[i].items() if v is not None})
            layers.append(rec)
        out.append({"step": step, "layers": layers})
    return out


def _series(points: list[tuple[int, float | None]], max_points: int) -> dict[str, list[Any]]:
    idx = subsample(len(points), max_points)
    return {"steps": [points[i][0] for i in idx], "values": [points[i][1] for i in idx]}


class DashboardService:
    """The run store plus (optionally) a runs directory imported into it on demand."""

    def __init__(self, settings: DashboardSettings) -> None:
        self.settings = settings
        self.runs_dir = Path(settings.runs_dir).expanduser() if settings.runs_dir is not None else None
        self.global_problems: list[dict[str, Any]] = []
        url = settings.resolved_store_url()
        if self.runs_dir is not None and not self.runs_dir.is_dir():
            self.global_problems.append(
                {
                    "kind": "missing",
                    "level": "error",
                    "file": None,
                    "line": None,
                    "message": f"runs directory {self.runs_dir} does not exist (yet)",
                }
            )
            if settings.store_url is None:
                url = "sqlite://"  # nothing to write next to: keep the imported rows in memory
        self.store = RunStore(url)
        self._problems: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._last_sync = -math.inf

    def close(self) -> None:
        self.store.close()

    # ---- import ------------------------------------------------------------------------------------
    def sync(self, force: bool = False) -> None:
        """Import what was appended to the runs directory, at most every ``sync_interval_s`` seconds."""
        if self.runs_dir is None:
            return
        if not force and time.monotonic() - self._last_sync < self.settings.sync_interval_s:
            return
        with self._lock:
            if not force and time.monotonic() - self._last_sync < self.settings.sync_interval_s:
                return
            if not self.runs_dir.is_dir():
                return
            self.global_problems = []
            for res in sync_runs_dir(self.store, self.runs_dir):
                self._problems[res.name] = res.problems
            self._last_sync = time.monotonic()

    def problems(self, name: str) -> list[dict[str, Any]]:
        return list(self._problems.get(name, []))

    # ---- runs --------------------------------------------------------------------------------------
    def _summary(self, rec: RunRecord) -> dict[str, Any]:
        latest: dict[str, float | None] = {}
        if rec.last_step is not None:
            for key, pts in self.store.get_metrics(
                rec.id, keys=["loss"], since_step=rec.last_step - 1
            ).items():
                latest[key] = pts[-1][1]
        evals = self.store.get_eval(rec.id, split="val")
        if "val" in evals and evals["val"].get("eval_loss"):
            latest["eval_loss"] = evals["val"]["eval_loss"][-1][1]
        return {
            "id": rec.id,
            "name": rec.name,
            "status": rec.status,
            "created_at": rec.created_at,
            "updated_at": rec.updated_at,
            "last_step": rec.last_step,
            "total_steps": _total_steps(rec),
            "latest": latest,
            "problems": self.problems(rec.name),
        }

    def list_runs(self) -> dict[str, Any]:
        self.sync()
        return {"runs": [self._summary(r) for r in self.store.list_runs()], "problems": self.global_problems}

    def run(self, run_id: int) -> RunRecord:
        return self.store.get_run(run_id)

    def run_detail(self, run_id: int) -> dict[str, Any]:
        self.sync()
        rec = self.run(run_id)
        hist = self.store.get_routing(rec.id, since_step=(rec.last_step or 0) - 1)
        return {
            **self._summary(rec),
            "run_dir": rec.run_dir,
            "config": rec.config,
            "summary": rec.summary,
            "metric_keys": self.store.metric_keys(rec.id),
            "num_layers": hist.num_layers,
            "num_experts": hist.num_experts,
        }

    def metrics(
        self, run_id: int, since_step: int | None = None, keys: list[str] | None = None
    ) -> dict[str, Any]:
        """New points after ``since_step`` (all of them, not subsampled), for live updates."""
        self.sync()
        rec = self.run(run_id)
        data = self.store.get_metrics(rec.id, keys=keys, since_step=since_step)
        evals = self.store.get_eval(rec.id, since_step=since_step)
        return {
            "run_id": rec.id,
            "status": rec.status,
            "last_step": rec.last_step,
            "metrics": {
                k: {"steps": [s for s, _ in v], "values": [x for _, x in v]} for k, v in data.items()
            },
            "eval": {
                sp: {k: {"steps": [s for s, _ in v], "values": [x for _, x in v]} for k, v in d.items()}
                for sp, d in evals.items()
            },
            "problems": self.problems(rec.name),
        }

    def routing(
        self, run_id: int, since_step: int | None = None, max_points: int | None = None
    ) -> dict[str, Any]:
        """Expert load heatmap data per layer: ``z[expert][column]`` over ``steps`` (subsampled)."""
        self.sync()
        rec = self.run(run_id)
        r_steps = [s for s in self.store.routing_steps(rec.id) if since_step is None or s > since_step]
        picked = [r_steps[i] for i in subsample(len(r_steps), max_points or self.settings.max_points)]
        hist = self.store.get_routing(rec.id, steps=picked)
        idx = list(range(len(hist.steps)))
        steps = hist.steps
        layers = []
        for layer in range(hist.num_layers):
            n_e = max((len(hist.load[i][layer]) for i in idx if layer < len(hist.load[i])), default=0)
            z = [
                [
                    (
                        hist.load[i][layer][e]
                        if layer < len(hist.load[i]) and e < len(hist.load[i][layer])
                        else None
                    )
                    for i in idx
                ]
                for e in range(n_e)
            ]
            layers.append({"layer": layer, "experts": n_e, "z": z})
        return {
            "run_id": rec.id,
            "last_step": rec.last_step,
            "steps": steps,
            "layers": layers,
            "problems": self.problems(rec.name),
        }

    def records(
        self, rec: RunRecord, max_points: int
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """(train records, eval records, routing records) of a run, subsampled to ``max_points`` steps."""
        all_steps = self.store.metric_steps(rec.id)
        picked = [all_steps[i] for i in subsample(len(all_steps), max_points)]
        data = self.store.get_metrics(rec.id, steps=picked)
        by_step: dict[int, dict[str, Any]] = {s: {"step": s} for s in picked}
        for key, pts in data.items():
            for step, value in pts:
                by_step[step][key] = value
        train = [by_step[s] for s in picked]
        ev = self.store.get_eval(rec.id, split="val").get("val", {})
        eval_steps = sorted({s for pts in ev.values() for s, _ in pts})
        evals = [{"step": s, **{k: dict(pts).get(s) for k, pts in ev.items()}} for s in eval_steps]
        r_steps = self.store.routing_steps(rec.id)
        r_picked = [r_steps[i] for i in subsample(len(r_steps), max_points)]
        hist = self.store.get_routing(rec.id, steps=r_picked)
        stats = self.store.get_layer_stats(rec.id, steps=r_picked)
        return train, evals, layer_records(hist, stats)


def _total_steps(rec: RunRecord) -> int | None:
    cfg = rec.config or {}
    train = cfg.get("train") if isinstance(cfg, dict) else None
    value = train.get("max_steps") if isinstance(train, dict) else None
    summary_total = (rec.summary or {}).get("total_steps")
    for v in (summary_total, value):
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None
