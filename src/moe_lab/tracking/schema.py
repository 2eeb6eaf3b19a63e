"""Tables of the run store (SQLAlchemy Core). Shared by SQLite and PostgreSQL.

One row per value: ``metrics`` holds ``(run_id, step, key) -> value`` for training scalars, ``eval_metrics``
``(run_id, step, split, key) -> value``, ``routing_stats`` ``(run_id, step, layer, expert) -> load`` (the
fraction of the layer's routed tokens that went to the expert) with optional token ``count`` and mean router
``prob``; ``layer_stats`` ``(run_id, step, layer, key) -> value`` holds per-layer scalars such as the router
entropy, load variance or drop rate. ``ingest_state`` remembers how far each run directory's files were read. Composite primary keys
make every write an idempotent upsert, so re-reading a file or a retried transaction never duplicates rows.

Example:
    >>> from moe_lab.tracking.schema import metadata
    >>> sorted(metadata.tables)[:3]
    ['eval_metrics', 'ingest_state', 'layer_stats']
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

__all__ = [
    "SCHEMA_VERSION",
    "eval_metrics",
    "ingest_state",
    "layer_stats",
    "meta",
    "metadata",
    "metrics",
    "routing_stats",
    "runs",
]

SCHEMA_VERSION = 1

metadata = MetaData()

meta = Table(
    "moe_lab_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("status", String(32), nullable=False, default="running"),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("config", JSON, nullable=True),
    Column("summary", JSON, nullable=True),
    Column("run_dir", Text, nullable=True),
)

metrics = Table(
    "metrics",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("step", Integer, primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("value", Float, nullable=True),
    Index("ix_metrics_run_key_step", "run_id", "key", "step"),
)

eval_metrics = Table(
    "eval_metrics",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("step", Integer, primary_key=True),
    Column("split", String(64), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("value", Float, nullable=True),
)

routing_stats = Table(
    "routing_stats",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("step", Integer, primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("expert", Integer, primary_key=True),
    Column("load", Float, nullable=False),
    Column("count", Integer, nullable=True),
    Column("prob", Float, nullable=True),
)

layer_stats = Table(
    "layer_stats",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("step", Integer, primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("value", Float, nullable=True),
)

ingest_state = Table(
    "ingest_state",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("file", String(255), primary_key=True),
    Column("byte_offset", BigInteger, nullable=False, default=0),
    Column("line_no", Integer, nullable=False, default=0),
    Column("last_step", Integer, nullable=True),
    Column("file_id", String(128), nullable=True),
    Column("head", Text, nullable=True),
    Column("errors", JSON, nullable=True),
)
