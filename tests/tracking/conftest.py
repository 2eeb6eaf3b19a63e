"""Fixtures of the run-store tests: a fresh store URL on SQLite (always) and PostgreSQL (when
``MOE_LAB_TEST_POSTGRES_URL`` is set, as ``.ci/postgres.sh`` does; each test gets its own schema)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest

PG_ENV = "MOE_LAB_TEST_POSTGRES_URL"


def _pg_url_with_schema(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A URL of an empty run store: a SQLite file, or a fresh schema in the test PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'runs.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f'{PG_ENV} not set (start a server with: eval "$(.ci/postgres.sh)")')
    from sqlalchemy import create_engine, text

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield _pg_url_with_schema(base, schema)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
