"""Dialect helpers of the run store: one idempotent upsert for SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Table, and_, delete

__all__ = ["upsert"]


def upsert(
    conn: Connection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    update_cols: Sequence[str],
) -> None:
    """Insert ``rows``; a row whose ``keys`` already exist replaces ``update_cols`` (last write wins)."""
    if not rows:
        return
    name = conn.dialect.name
    if name in ("sqlite", "postgresql"):
        from sqlalchemy.dialects import postgresql, sqlite

        insert: Any = sqlite.insert if name == "sqlite" else postgresql.insert
        # later duplicates inside one batch would make ON CONFLICT fail on PostgreSQL: keep the last one
        unique = list({tuple(r[k] for k in keys): r for r in rows}.values())
        stmt = insert(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=list(keys), set_={c: stmt.excluded[c] for c in update_cols}
        )
        conn.execute(stmt, unique)
        return
    for row in rows:  # pragma: no cover - other dialects: delete + insert in the caller's transaction
        conn.execute(delete(table).where(and_(*(table.c[k] == row[k] for k in keys))))
        conn.execute(table.insert().values(**row))
