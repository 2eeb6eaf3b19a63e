"""RunStore on SQLite and PostgreSQL: round trips, upserts, schema idempotence, secrets never shown."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from moe_lab.tracking import RunStore, StoreError, redact_url, resolve_url
from moe_lab.tracking import schema as S


def test_metrics_round_trip_and_filters(store_url):
    store = RunStore(store_url)
    rid = store.create_run("r1", config={"model": {"num_experts": 4}}, run_dir="/tmp/r1")
    for step in range(1, 6):
        n = store.log_metrics(rid, step, {"loss": 3.0 - 0.1 * step, "lr": 1e-3, "note": "text", "flag": True})
        assert n == 2  # strings and booleans are not metrics
    got = store.get_metrics(rid)
    assert sorted(got) == ["loss", "lr"]
    assert [s for s, _ in got["loss"]] == [1, 2, 3, 4, 5]
    assert got["loss"][2][1] == pytest.approx(2.7)
    assert store.get_metrics(rid, keys=["loss"], since_step=3) == {
        "loss": [(4, pytest.approx(2.6)), (5, pytest.approx(2.5))]
    }
    assert store.metric_keys(rid) == ["loss", "lr"]
    rec = store.get_run(rid)
    assert rec.name == "r1" and rec.status == "running" and rec.last_step == 5
    assert rec.config == {"model": {"num_experts": 4}} and rec.run_dir == "/tmp/r1"
    assert store.get_run("r1").id == rid


def test_rewrite_of_a_step_replaces_not_duplicates(store_url):
    store = RunStore(store_url)
    rid = store.create_run("r")
    store.log_metrics(rid, 7, {"loss": 1.0})
    store.log_metrics(rid, 7, {"loss": 0.5})
    store.log_routing(rid, 7, [[0.5, 0.5]])
    store.log_routing(rid, 7, [[0.25, 0.75]])
    assert store.get_metrics(rid) == {"loss": [(7, 0.5)]}
    assert store.get_routing(rid).load == [[[0.25, 0.75]]]
    assert store.count_rows(rid) == {"metrics": 1, "eval_metrics": 0, "routing_stats": 2, "layer_stats": 0}


def test_non_finite_values_are_stored_as_null(store_url):
    store = RunStore(store_url)
    rid = store.create_run("nan")
    store.log_metrics(rid, 1, {"loss": math.nan, "grad_norm": math.inf, "lr": 0.1})
    assert store.get_metrics(rid) == {"grad_norm": [(1, None)], "loss": [(1, None)], "lr": [(1, 0.1)]}


def test_routing_eval_and_layer_stats(store_url):
    store = RunStore(store_url)
    rid = store.create_run("routing")
    loads = [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]
    counts = [[1, 2, 3, 4], [5, 5, 5, 5]]
    assert store.log_routing(rid, 10, loads, counts=counts) == 8
    store.log_routing(rid, 20, [[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.4, 0.4]])
    hist = store.get_routing(rid)
    assert hist.steps == [10, 20]
    assert hist.load[0] == loads and hist.count[0] == counts
    assert (hist.num_layers, hist.num_experts) == (2, 4)
    one = store.get_routing(rid, since_step=10, layer=1)
    assert one.steps == [20] and one.load == [[[0.1, 0.1, 0.4, 0.4]]]

    store.log_eval(rid, 20, {"eval_loss": 2.0, "perplexity": math.exp(2.0)})
    store.log_eval(rid, 20, {"eval_loss": 2.5}, split="test")
    ev = store.get_eval(rid)
    assert ev["val"]["eval_loss"] == [(20, 2.0)] and ev["test"] == {"eval_loss": [(20, 2.5)]}
    assert store.get_eval(rid, split="val", since_step=20) == {}

    store.log_layer_stats(rid, 20, [{"entropy_normalized": 0.9, "cv": 0.1}, {"entropy_normalized": 0.8}])
    assert store.get_layer_stats(rid) == [
        (20, [{"cv": 0.1, "entropy_normalized": 0.9}, {"entropy_normalized": 0.8}])
    ]


def test_write_batch_is_one_transaction(store_url, monkeypatch):
    import moe_lab.tracking.store as store_mod

    store = RunStore(store_url)
    rid = store.create_run("batch")
    with pytest.raises(IntegrityError):  # unknown run id: foreign key
        store.write_batch(rid + 1000, metrics=[(1, {"loss": 1.0})])
    real_upsert = store_mod.upsert

    def failing_upsert(conn, table, rows, keys, cols):
        if table.name == "routing_stats":
            raise RuntimeError("disk full")
        return real_upsert(conn, table, rows, keys, cols)

    monkeypatch.setattr(store_mod, "upsert", failing_upsert)
    with pytest.raises(RuntimeError, match="disk full"):
        store.log_step(rid, 1, {"loss": 1.0}, loads=[[1.0]])
    # the metrics written before the failure in the same transaction were rolled back
    assert store.count_rows(rid)["metrics"] == 0
    monkeypatch.setattr(store_mod, "upsert", real_upsert)
    assert store.log_step(rid, 1, {"loss": 1.0}, loads=[[1.0]]) == 2


def test_runs_lifecycle(store_url):
    store = RunStore(store_url)
    a = store.create_run("a")
    b = store.create_run("b", status="queued")
    assert store.create_run("a") == a  # exist_ok reuses
    with pytest.raises(StoreError, match="already exists"):
        store.create_run("a", exist_ok=False)
    store.finish_run(a, summary={"final_loss": 1.5, "bad": math.nan})
    store.set_status(b, "failed")
    runs = {r.name: r for r in store.list_runs()}
    assert runs["a"].status == "finished" and runs["a"].summary == {"final_loss": 1.5, "bad": None}
    assert runs["b"].status == "failed" and runs["b"].last_step is None
    with pytest.raises(StoreError, match="no run"):
        store.get_run(999)
    with pytest.raises(StoreError, match="no run with id 999"):
        store.finish_run(999)
    assert store.find_run("zzz") is None


def test_schema_creation_is_idempotent(store_url):
    first = RunStore(store_url)
    rid = first.create_run("keep")
    first.log_metrics(rid, 1, {"loss": 1.0})
    first.create_schema()
    first.close()
    second = RunStore(store_url)  # creating again must neither fail nor drop data
    second.create_schema()
    assert second.schema_version() == S.SCHEMA_VERSION
    assert second.get_metrics(rid) == {"loss": [(1, 1.0)]}
    engine = create_engine(resolve_url(store_url))
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert set(S.metadata.tables) <= tables


def test_newer_schema_version_is_refused(store_url):
    store = RunStore(store_url)
    store.write(
        lambda c: c.execute(text("UPDATE moe_lab_meta SET value = '99' WHERE key = 'schema_version'"))
    )
    with pytest.raises(StoreError, match="schema version 99"):
        RunStore(store_url)


def test_sqlite_uses_wal_and_busy_timeout(tmp_path):
    store = RunStore(tmp_path / "x" / "runs.db", busy_timeout_s=7)
    mode = store.read(lambda c: c.exec_driver_sql("PRAGMA journal_mode").scalar())
    timeout = store.read(lambda c: c.exec_driver_sql("PRAGMA busy_timeout").scalar())
    assert mode == "wal" and timeout == 7000
    assert (tmp_path / "x" / "runs.db").is_file()


def test_url_resolution_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LAB_STORE_URL", f"sqlite:///{tmp_path}/env.db")
    assert RunStore().url == f"sqlite:///{tmp_path}/env.db"
    monkeypatch.delenv("MOE_LAB_STORE_URL")
    assert str(resolve_url(None)) == "sqlite:///runs/runs.db"
    assert str(resolve_url("postgresql://u@h/db")).startswith("postgresql+psycopg://")
    with pytest.raises(StoreError, match="unsupported run store backend 'mysql'"):
        RunStore("mysql://u:pw@localhost/db")
    with pytest.raises(StoreError, match="invalid run store URL"):
        RunStore("sqlite+:://")


def test_password_is_never_shown(caplog):
    url = "postgresql+psycopg://moe:s3cr3t-pw@127.0.0.1:1/nodb?connect_timeout=2"
    assert "s3cr3t-pw" not in redact_url(url)
    caplog.set_level("DEBUG")
    with pytest.raises(StoreError) as info:
        RunStore(url, max_retries=0)  # nothing listens on port 1: connection refused
    assert "s3cr3t-pw" not in str(info.value)
    assert "***" in str(info.value)
    assert "s3cr3t-pw" not in caplog.text
    store = RunStore.__new__(RunStore)
    store._url = resolve_url(url)
    assert "s3cr3t-pw" not in repr(store) and "s3cr3t-pw" not in store.url


def test_step_listing_and_step_filters(store_url):
    store = RunStore(store_url)
    rid = store.create_run("steps")
    for step in (1, 2, 5, 9):
        store.log_step(rid, step, {"loss": float(step), "lr": 0.1}, loads=[[0.5, 0.5], [1.0, 0.0]])
    store.log_layer_stats(rid, 5, [{"cv": 0.0}, {"cv": 1.0}])
    assert store.metric_steps(rid) == [1, 2, 5, 9] and store.routing_steps(rid) == [1, 2, 5, 9]
    assert store.get_metrics(rid, keys=["loss"], steps=[2, 9, 100]) == {"loss": [(2, 2.0), (9, 9.0)]}
    assert store.get_metrics(rid, keys=["loss"], since_step=2, steps=[2, 5]) == {"loss": [(5, 5.0)]}
    assert store.get_routing(rid, steps=[5]).load == [[[0.5, 0.5], [1.0, 0.0]]]
    assert store.get_layer_stats(rid, steps=[1, 5]) == [(5, [{"cv": 0.0}, {"cv": 1.0}])]
    assert store.delete_steps_after(rid, 2) == 2 * 2 + 2 * 4 + 2
    assert store.metric_steps(rid) == [1, 2] and store.get_layer_stats(rid) == []
    with pytest.raises(StoreError, match="unknown table"):
        store.delete_steps_after(rid, 0, ["runs"])
