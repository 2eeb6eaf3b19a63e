"""Store URLs and SQLAlchemy engines: SQLite in WAL mode with ``BEGIN IMMEDIATE`` writes, or PostgreSQL.

Example:
    >>> from moe_lab.tracking.engine import redact_url
    >>> redact_url("postgresql+psycopg://moe:secret@db:5432/runs")
    'postgresql+psycopg://moe:***@db:5432/runs'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.pool import StaticPool

from moe_lab.tracking.records import StoreError

__all__ = ["DEFAULT_URL", "ENV_URL", "is_retryable", "make_engine", "redact_url", "resolve_url"]

ENV_URL = "MOE_LAB_STORE_URL"
DEFAULT_URL = "sqlite:///runs/runs.db"


def redact_url(url: str | URL) -> str:
    """The URL with its password replaced by ``***`` (safe to log)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<unparseable store URL>"


def resolve_url(url: str | os.PathLike[str] | None = None) -> URL:
    """The store URL: ``url``, else ``$MOE_LAB_STORE_URL``, else ``sqlite:///runs/runs.db``.

    A plain filesystem path (``runs/runs.db``) means a SQLite file there.
    """
    raw = os.fspath(url) if url is not None else (os.environ.get(ENV_URL) or DEFAULT_URL)
    if "://" not in raw:
        raw = "sqlite:///" + str(Path(raw).expanduser().resolve())
    try:
        parsed = make_url(raw)
    except (ArgumentError, ValueError):
        raise StoreError(
            "invalid run store URL (expected sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB)"
        ) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreError(
            f"unsupported run store backend '{parsed.get_backend_name()}' in {redact_url(parsed)}: "
            "use sqlite:///PATH or postgresql+psycopg://..."
        )
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def is_retryable(err: DBAPIError) -> bool:
    """True for errors worth retrying: SQLite lock contention, PostgreSQL serialization / deadlock."""
    msg = str(err.orig).lower() if err.orig is not None else str(err).lower()
    if "database is locked" in msg or "database is busy" in msg or "database table is locked" in msg:
        return True
    sqlstate = getattr(err.orig, "sqlstate", None)
    # serialization failure, deadlock, too many connections / cannot connect now
    return sqlstate in {"40001", "40P01", "53300", "57P03"}


def make_engine(url: URL, busy_timeout_s: float = 30.0) -> Engine:
    """An engine for ``url``. SQLite: WAL journal, ``synchronous=NORMAL``, busy timeout, foreign keys, and
    ``BEGIN IMMEDIATE`` for connections marked ``execution_options(moe_lab_write=True)``."""
    if url.get_backend_name() == "sqlite":
        db = url.database
        memory = not db or db == ":memory:"
        if db and not memory:
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {"connect_args": {"timeout": busy_timeout_s, "check_same_thread": False}}
        if memory:
            kwargs["poolclass"] = StaticPool
        engine = create_engine(url, **kwargs)
        busy_ms = int(busy_timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (IMMEDIATE for writes)
            cur = dbapi_conn.cursor()
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            write = conn.get_execution_options().get("moe_lab_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)
