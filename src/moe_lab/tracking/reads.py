"""The read queries of :class:`moe_lab.tracking.RunStore` (a mixin: ``RunStore`` adds the connection).

Example:
    >>> from moe_lab.tracking import RunStore
    >>> store = RunStore("sqlite://")
    >>> rid = store.create_run("r")
    >>> _ = store.log_metrics(rid, 3, {"loss": 1.0})
    >>> store.metric_steps(rid)
    [3]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection, func, select

from moe_lab.tracking import schema as S
from moe_lab.tracking.records import IngestState, RoutingHistory, RunRecord, StoreError

__all__ = ["StoreReads"]

T = TypeVar("T")
VALUE_TABLES = (S.metrics, S.eval_metrics, S.routing_stats, S.layer_stats)


class StoreReads:
    """Read methods shared by every run store backend."""

    @property
    def url(self) -> str:  # provided by RunStore
        raise NotImplementedError

    def read(self, fn: Callable[[Connection], T]) -> T:  # provided by RunStore
        raise NotImplementedError

    def _records(self, conn: Connection, where: Any = None) -> list[RunRecord]:
        last = (
            select(S.metrics.c.run_id, func.max(S.metrics.c.step).label("last_step"))
            .group_by(S.metrics.c.run_id)
            .subquery()
        )
        q = (
            select(S.runs, last.c.last_step)
            .outerjoin(last, last.c.run_id == S.runs.c.id)
            .order_by(S.runs.c.id)
        )
        if where is not None:
            q = q.where(where)
        return [RunRecord(**dict(r._mapping)) for r in conn.execute(q)]

    def list_runs(self) -> list[RunRecord]:
        """All runs, oldest first, each with its last logged step."""
        return self.read(self._records)

    def get_run(self, run: int | str) -> RunRecord:
        """One run by id or name; raises :class:`StoreError` when unknown."""
        where = S.runs.c.id == run if isinstance(run, int) else S.runs.c.name == run
        found = self.read(lambda c: self._records(c, where))
        if not found:
            raise StoreError(f"no run {run!r} in {self.url}")
        return found[0]

    def find_run(self, name: str) -> RunRecord | None:
        """The run called ``name``, or None."""
        found = self.read(lambda c: self._records(c, S.runs.c.name == name))
        return found[0] if found else None

    def get_metrics(
        self,
        run_id: int,
        keys: Sequence[str] | None = None,
        since_step: int | None = None,
        steps: Sequence[int] | None = None,
    ) -> dict[str, list[tuple[int, float | None]]]:
        """``{key: [(step, value), ...]}`` ordered by step; only steps ``> since_step`` / in ``steps``."""
        q = select(S.metrics.c.key, S.metrics.c.step, S.metrics.c.value).where(S.metrics.c.run_id == run_id)
        if keys is not None:
            q = q.where(S.metrics.c.key.in_(list(keys)))
        q = _filter_steps(q, S.metrics.c.step, since_step, steps)
        out: dict[str, list[tuple[int, float | None]]] = {}
        for key, step, value in self.read(
            lambda c: c.execute(q.order_by(S.metrics.c.key, S.metrics.c.step)).all()
        ):
            out.setdefault(key, []).append((int(step), value))
        return out

    def get_eval(
        self, run_id: int, split: str | None = None, since_step: int | None = None
    ) -> dict[str, dict[str, list[tuple[int, float | None]]]]:
        """``{split: {key: [(step, value), ...]}}`` of the evaluation metrics."""
        t = S.eval_metrics
        q = select(t.c.split, t.c.key, t.c.step, t.c.value).where(t.c.run_id == run_id)
        if split is not None:
            q = q.where(t.c.split == split)
        if since_step is not None:
            q = q.where(t.c.step > since_step)
        out: dict[str, dict[str, list[tuple[int, float | None]]]] = {}
        for sp, key, step, value in self.read(
            lambda c: c.execute(q.order_by(t.c.split, t.c.key, t.c.step)).all()
        ):
            out.setdefault(sp, {}).setdefault(key, []).append((int(step), value))
        return out

    def get_routing(
        self,
        run_id: int,
        since_step: int | None = None,
        layer: int | None = None,
        steps: Sequence[int] | None = None,
    ) -> RoutingHistory:
        """Expert loads over time (see :class:`RoutingHistory`); ``layer`` keeps one layer (as layer 0)."""
        t = S.routing_stats
        q = select(t.c.step, t.c.layer, t.c.expert, t.c.load, t.c.count).where(t.c.run_id == run_id)
        q = _filter_steps(q, t.c.step, since_step, steps)
        if layer is not None:
            q = q.where(t.c.layer == layer)
        rows = self.read(lambda c: c.execute(q.order_by(t.c.step, t.c.layer, t.c.expert)).all())
        hist = RoutingHistory()
        for step, lay, expert, load, count in rows:
            if not hist.steps or hist.steps[-1] != step:
                hist.steps.append(int(step))
                hist.load.append([])
                hist.count.append([])
            li = 0 if layer is not None else int(lay)
            loads, counts = hist.load[-1], hist.count[-1]
            while len(loads) <= li:
                loads.append([])
                counts.append([])
            while len(loads[li]) < expert:  # a gap in the expert ids: fill with 0
                loads[li].append(0.0)
                counts[li].append(None)
            loads[li].append(float(load))
            counts[li].append(count)
        return hist

    def get_layer_stats(
        self, run_id: int, since_step: int | None = None, steps: Sequence[int] | None = None
    ) -> list[tuple[int, list[dict[str, float | None]]]]:
        """``[(step, [{key: value} per layer]), ...]`` ordered by step."""
        t = S.layer_stats
        q = select(t.c.step, t.c.layer, t.c.key, t.c.value).where(t.c.run_id == run_id)
        q = _filter_steps(q, t.c.step, since_step, steps)
        rows = self.read(lambda c: c.execute(q.order_by(t.c.step, t.c.layer)).all())
        out: list[tuple[int, list[dict[str, float | None]]]] = []
        for step, layer, key, value in rows:
            if not out or out[-1][0] != step:
                out.append((int(step), []))
            layers = out[-1][1]
            while len(layers) <= layer:
                layers.append({})
            layers[layer][key] = value
        return out

    def metric_steps(self, run_id: int) -> list[int]:
        """Every step with a training metric, ascending (pick a subsample, then ask for those ``steps``)."""
        t = S.metrics
        q = select(t.c.step).where(t.c.run_id == run_id).distinct().order_by(t.c.step)
        return [int(r[0]) for r in self.read(lambda c: c.execute(q).all())]

    def routing_steps(self, run_id: int) -> list[int]:
        """Every step with expert loads, ascending."""
        t = S.routing_stats
        q = select(t.c.step).where(t.c.run_id == run_id, t.c.layer == 0, t.c.expert == 0).order_by(t.c.step)
        return [int(r[0]) for r in self.read(lambda c: c.execute(q).all())]

    def metric_keys(self, run_id: int) -> list[str]:
        """The metric keys logged for a run, sorted."""
        q = select(S.metrics.c.key).where(S.metrics.c.run_id == run_id).distinct().order_by(S.metrics.c.key)
        return [r[0] for r in self.read(lambda c: c.execute(q).all())]

    def count_rows(self, run_id: int | None = None) -> dict[str, int]:
        """Row counts of the value tables (for checks and tests)."""

        def _do(conn: Connection) -> dict[str, int]:
            out = {}
            for t in VALUE_TABLES:
                q = select(func.count()).select_from(t)
                if run_id is not None:
                    q = q.where(t.c.run_id == run_id)
                out[t.name] = int(conn.execute(q).scalar_one())
            return out

        return self.read(_do)

    def get_ingest_state(self, run_id: int, file: str) -> IngestState | None:
        """Where ingest stopped reading ``file`` of a run, or None."""
        t = S.ingest_state
        row = self.read(lambda c: c.execute(select(t).where(t.c.run_id == run_id, t.c.file == file)).first())
        if row is None:
            return None
        data = dict(row._mapping)
        data.pop("run_id")
        return IngestState(**data)


def _filter_steps(q: Any, column: Any, since_step: int | None, steps: Sequence[int] | None) -> Any:
    if since_step is not None:
        q = q.where(column > since_step)
    if steps is not None:
        q = q.where(column.in_(sorted({int(s) for s in steps})))
    return q
