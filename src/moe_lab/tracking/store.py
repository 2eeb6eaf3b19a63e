"""The run store: runs, training metrics, eval metrics and per-expert routing loads in a SQL database.

SQLite by default (one file, WAL mode, busy timeout, ``BEGIN IMMEDIATE`` for writes and retries on
``database is locked``) or PostgreSQL by URL (``postgresql+psycopg://user:pass@host:port/db``). The URL comes
from the argument, else the environment variable ``MOE_LAB_STORE_URL``, else ``sqlite:///runs/runs.db``.
Passwords live only in that URL: ``repr(store)`` and every message show it redacted.

Each ``log_*`` call is one transaction and an idempotent upsert keyed by ``(run, step, key)``, so several
processes can write at once, a retried transaction never duplicates rows and a crash never leaves half a step.

Example:
    >>> from moe_lab.tracking import RunStore
    >>> store = RunStore("sqlite://")                     # in memory; pass a file path or URL in real use
    >>> run_id = store.create_run("demo", config={"model": {"num_experts": 4}})
    >>> store.log_metrics(run_id, 1, {"loss": 2.5, "lr": 1e-3})
    2
    >>> store.log_routing(run_id, 1, [[0.5, 0.25, 0.125, 0.125]])
    4
    >>> store.get_metrics(run_id, keys=["loss"])
    {'loss': [(1, 2.5)]}
    >>> store.finish_run(run_id)
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, TypeVar

from sqlalchemy import Connection, delete, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from moe_lab.tracking import schema as S
from moe_lab.tracking._sql import upsert
from moe_lab.tracking.engine import ENV_URL, is_retryable, make_engine, redact_url, resolve_url
from moe_lab.tracking.reads import VALUE_TABLES, StoreReads
from moe_lab.tracking.records import IngestState, RoutingHistory, RunRecord, StoreError

__all__ = [
    "ENV_URL",
    "IngestState",
    "RoutingHistory",
    "RunRecord",
    "RunStore",
    "StoreError",
    "redact_url",
    "resolve_url",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


def _finite(value: Any) -> float | None:
    f = float(value)
    return f if math.isfinite(f) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RunStore(StoreReads):
    """A run store on SQLite or PostgreSQL (see the module docstring).

    Args:
        url: ``sqlite:///path/runs.db``, a plain path, ``postgresql+psycopg://...`` or None (environment).
        create: create the tables if missing (idempotent, safe from several processes at once).
        busy_timeout_s: how long a SQLite writer waits for the lock before a retry.
        max_retries: retries of a transaction that failed on a lock / serialization conflict.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        create: bool = True,
        busy_timeout_s: float = 30.0,
        max_retries: int = 20,
    ) -> None:
        self._url = resolve_url(url)
        self.backend = self._url.get_backend_name()
        self.max_retries = max_retries
        self._engine = make_engine(self._url, busy_timeout_s)
        if create:
            self.create_schema()

    # ---- engine ------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The store URL with the password redacted."""
        return redact_url(self._url)

    def __repr__(self) -> str:
        return f"RunStore(url={self.url!r})"

    def close(self) -> None:
        """Release the connection pool."""
        self._engine.dispose()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transactions ------------------------------------------------------------------------------
    def _with_retries(self, fn: Callable[[Connection], T], *, write: bool) -> T:
        delay = 0.01
        for attempt in range(self.max_retries + 1):
            try:
                with self._engine.connect() as conn:
                    if write:
                        conn.execution_options(moe_lab_write=True)
                    with conn.begin():
                        return fn(conn)
            except DBAPIError as err:
                if attempt < self.max_retries and is_retryable(err):
                    log.debug("run store busy (attempt %d), retrying", attempt + 1)
                    time.sleep(delay * (1 + random.random()))  # noqa: S311 - jitter, not crypto
                    delay = min(delay * 2, 1.0)
                    continue
                if isinstance(err, OperationalError):
                    reason = str(err.orig).splitlines()[0] if err.orig is not None else type(err).__name__
                    raise StoreError(f"run store {self.url}: {reason}") from None
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` in one write transaction, retried on lock / serialization conflicts."""
        return self._with_retries(fn, write=True)

    def read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` in one read transaction."""
        return self._with_retries(fn, write=False)

    # ---- schema ------------------------------------------------------------------------------------
    def create_schema(self) -> None:
        """Create missing tables and record the schema version. Idempotent and safe to race."""

        def _do(conn: Connection) -> None:
            if self.backend == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(7236066101)"))
            S.metadata.create_all(conn, checkfirst=True)
            row = conn.execute(select(S.meta.c.value).where(S.meta.c.key == "schema_version")).first()
            if row is None:
                conn.execute(S.meta.insert().values(key="schema_version", value=str(S.SCHEMA_VERSION)))
            elif int(row[0]) > S.SCHEMA_VERSION:
                raise StoreError(
                    f"run store {self.url} has schema version {row[0]}, newer than this moe-lab "
                    f"({S.SCHEMA_VERSION}): upgrade moe-lab"
                )

        self.write(_do)

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        row = self.read(
            lambda c: c.execute(select(S.meta.c.value).where(S.meta.c.key == "schema_version")).first()
        )
        return int(row[0]) if row else 0

    # ---- runs --------------------------------------------------------------------------------------
    def create_run(
        self,
        name: str,
        *,
        config: Mapping[str, Any] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        status: str = "running",
        exist_ok: bool = True,
    ) -> int:
        """Create the run ``name`` (or, with ``exist_ok``, update and reuse it) and return its id."""
        if not name or not isinstance(name, str):
            raise StoreError("run name must be a non-empty string")
        now = time.time()
        cfg = _json_safe(config) if config is not None else None
        rdir = str(run_dir) if run_dir is not None else None

        def _do(conn: Connection) -> int:
            row = conn.execute(select(S.runs.c.id).where(S.runs.c.name == name)).first()
            if row is not None:
                if not exist_ok:
                    raise StoreError(f"run '{name}' already exists in {self.url}")
                values: dict[str, Any] = {"status": status, "updated_at": now}
                if cfg is not None:
                    values["config"] = cfg
                if rdir is not None:
                    values["run_dir"] = rdir
                conn.execute(update(S.runs).where(S.runs.c.id == row[0]).values(**values))
                return int(row[0])
            res = conn.execute(
                S.runs.insert().values(
                    name=name, status=status, created_at=now, updated_at=now, config=cfg, run_dir=rdir
                )
            )
            pk = res.inserted_primary_key
            assert pk is not None
            return int(pk[0])

        try:
            return self.write(_do)
        except IntegrityError:  # another process created the same name meanwhile: reuse it
            return self.write(_do)

    def finish_run(
        self, run_id: int, status: str = "finished", summary: Mapping[str, Any] | None = None
    ) -> None:
        """Mark a run ``finished`` (or ``failed``, ``stopped`` ...) and store its summary."""
        values: dict[str, Any] = {"status": status, "updated_at": time.time()}
        if summary is not None:
            values["summary"] = _json_safe(summary)
        self.write(lambda c: self._update_run(c, run_id, values))

    def set_status(self, run_id: int, status: str) -> None:
        """Set a run's status without touching its summary."""
        self.write(lambda c: self._update_run(c, run_id, {"status": status, "updated_at": time.time()}))

    def _update_run(self, conn: Connection, run_id: int, values: dict[str, Any]) -> None:
        res = conn.execute(update(S.runs).where(S.runs.c.id == run_id).values(**values))
        if res.rowcount == 0:
            raise StoreError(f"no run with id {run_id} in {self.url}")

    # ---- writes ------------------------------------------------------------------------------------
    def write_batch(
        self,
        run_id: int,
        *,
        metrics: Sequence[tuple[int, Mapping[str, Any]]] = (),
        evals: Sequence[tuple[int, str, Mapping[str, Any]]] = (),
        routing: Sequence[tuple[int, Sequence[Sequence[float]], Any, Any]] = (),
        layer_stats: Sequence[tuple[int, Sequence[Mapping[str, Any]]]] = (),
        ingest: IngestState | None = None,
    ) -> int:
        """Write many steps in ONE transaction; returns the number of value rows written.

        ``metrics`` holds ``(step, {key: number})`` (non-numbers are ignored), ``evals`` holds
        ``(step, split, {key: number})``, ``routing`` holds ``(step, loads[layer][expert], counts|None,
        probs|None)``, ``layer_stats`` holds ``(step, [{key: number} per layer])``. ``ingest`` (used by :func:`moe_lab.tracking.ingest.sync_run_dir`) is saved in the same
        transaction, so the file position and the rows it produced commit together.
        """
        m_rows = [
            {"run_id": run_id, "step": int(step), "key": str(k), "value": _finite(v)}
            for step, values in metrics
            for k, v in values.items()
            if _is_number(v)
        ]
        e_rows = [
            {"run_id": run_id, "step": int(step), "split": str(split), "key": str(k), "value": _finite(v)}
            for step, split, values in evals
            for k, v in values.items()
            if _is_number(v)
        ]
        r_rows = [
            row
            for step, loads, counts, probs in routing
            for row in _routing_rows(run_id, step, loads, counts, probs)
        ]
        l_rows = [
            {"run_id": run_id, "step": int(step), "layer": layer, "key": str(k), "value": _finite(v)}
            for step, layers in layer_stats
            for layer, values in enumerate(layers)
            for k, v in values.items()
            if _is_number(v)
        ]
        now = time.time()

        def _do(conn: Connection) -> int:
            if m_rows:
                upsert(conn, S.metrics, m_rows, ["run_id", "step", "key"], ["value"])
            if e_rows:
                upsert(conn, S.eval_metrics, e_rows, ["run_id", "step", "split", "key"], ["value"])
            if r_rows:
                upsert(
                    conn,
                    S.routing_stats,
                    r_rows,
                    ["run_id", "step", "layer", "expert"],
                    ["load", "count", "prob"],
                )
            if l_rows:
                upsert(conn, S.layer_stats, l_rows, ["run_id", "step", "layer", "key"], ["value"])
            if ingest is not None:
                row = {"run_id": run_id, **asdict(ingest)}
                upsert(
                    conn,
                    S.ingest_state,
                    [row],
                    ["run_id", "file"],
                    [k for k in row if k not in ("run_id", "file")],
                )
            n = len(m_rows) + len(e_rows) + len(r_rows) + len(l_rows)
            if n:
                conn.execute(update(S.runs).where(S.runs.c.id == run_id).values(updated_at=now))
            return n

        return self.write(_do)

    def log_metrics(self, run_id: int, step: int, metrics: Mapping[str, Any]) -> int:
        """Write the numeric scalars of ``metrics`` at ``step`` (one transaction); returns rows written."""
        return self.write_batch(run_id, metrics=[(step, metrics)])

    def log_eval(self, run_id: int, step: int, metrics: Mapping[str, Any], split: str = "val") -> int:
        """Write evaluation scalars (``eval_loss``, ``perplexity`` ...) of ``split`` at ``step``."""
        return self.write_batch(run_id, evals=[(step, split, metrics)])

    def log_routing(
        self,
        run_id: int,
        step: int,
        loads: Sequence[Sequence[float]],
        counts: Sequence[Sequence[int]] | None = None,
        probs: Sequence[Sequence[float]] | None = None,
    ) -> int:
        """Write per-layer expert loads ``loads[layer][expert]`` (fractions), optional token counts and
        mean router probabilities of the same shape; returns rows written."""
        return self.write_batch(run_id, routing=[(step, loads, counts, probs)])

    def log_layer_stats(self, run_id: int, step: int, layers: Sequence[Mapping[str, Any]]) -> int:
        """Write per-layer scalars (``[{"entropy_normalized": .., "cv": ..}, ...]``, one dict per MoE layer)."""
        return self.write_batch(run_id, layer_stats=[(step, layers)])

    def log_step(
        self,
        run_id: int,
        step: int,
        metrics: Mapping[str, Any],
        loads: Sequence[Sequence[float]] | None = None,
    ) -> int:
        """Metrics and (optionally) expert loads of one step in one transaction."""
        routing = [(step, loads, None, None)] if loads else []
        return self.write_batch(run_id, metrics=[(step, metrics)], routing=routing)

    def delete_steps_after(self, run_id: int, step: int | None, tables: Sequence[str] | None = None) -> int:
        """Delete a run's rows logged after ``step`` (all of them when None) from the value tables
        (``metrics``, ``eval_metrics``, ``routing_stats``, ``layer_stats`` or the ``tables`` named).
        Used when a run directory's log was replaced (``--overwrite``) or truncated (resume)."""
        names = list(tables) if tables is not None else [t.name for t in VALUE_TABLES]
        chosen = [t for t in VALUE_TABLES if t.name in names]
        if len(chosen) != len(names):
            raise StoreError(f"unknown table in {names}: expected some of {[t.name for t in VALUE_TABLES]}")

        def _do(conn: Connection) -> int:
            n = 0
            for t in chosen:
                q = delete(t).where(t.c.run_id == run_id)
                if step is not None:
                    q = q.where(t.c.step > step)
                n += conn.execute(q).rowcount or 0
            return n

        return self.write(_do)

    # ---- reads -------------------------------------------------------------------------------------


def _routing_rows(
    run_id: int, step: int, loads: Sequence[Sequence[float]], counts: Any, probs: Any
) -> list[dict[str, Any]]:
    rows = []
    for layer, layer_loads in enumerate(loads):
        for expert, load in enumerate(layer_loads):
            f = _finite(load)
            rows.append(
                {
                    "run_id": run_id,
                    "step": int(step),
                    "layer": layer,
                    "expert": expert,
                    "load": f if f is not None else 0.0,
                    "count": int(counts[layer][expert]) if counts is not None else None,
                    "prob": _finite(probs[layer][expert]) if probs is not None else None,
                }
            )
    return rows


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)
