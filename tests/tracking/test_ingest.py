"""sync_run_dir: incremental import of metrics.jsonl / routing.jsonl, partial and corrupt lines reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_lab.tracking import RunStore, sync_run_dir, sync_runs_dir


def _train_line(step: int) -> str:
    return json.dumps(
        {
            "step": step,
            "loss": 4.0 - 0.01 * step,
            "lm_loss": 3.9,
            "aux_loss": 0.01,
            "z_loss": 0.001,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "tokens_per_s": 1000.0,
            "expert_load": [[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]],
            "drop_rate": 0.0,
        }
    )


def _write(path: Path, text: str, mode: str = "a") -> None:
    with path.open(mode, encoding="utf-8") as fh:
        fh.write(text)


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "runs" / "exp1"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("model:\n  num_experts: 4\ntrain:\n  max_steps: 10\n")
    _write(d / "metrics.jsonl", "".join(_train_line(s) + "\n" for s in range(1, 4)))
    return d


def test_ingest_is_incremental(store_url, run_dir):
    store = RunStore(store_url)
    first = sync_run_dir(store, run_dir)
    assert first.name == "exp1" and first.new_lines == 3 and first.last_step == 3 and first.problems == []
    rec = store.get_run("exp1")
    assert rec.config == {"model": {"num_experts": 4}, "train": {"max_steps": 10}} and rec.status == "running"
    assert [s for s, _ in store.get_metrics(rec.id, keys=["loss"])["loss"]] == [1, 2, 3]
    assert store.get_routing(rec.id).steps == [1, 2, 3]
    assert "expert_load" not in store.get_metrics(rec.id)

    again = sync_run_dir(store, run_dir)
    assert again.new_lines == 0 and again.new_rows == 0  # nothing new: nothing read

    _write(run_dir / "metrics.jsonl", _train_line(4) + "\n")
    _write(
        run_dir / "metrics.jsonl",
        json.dumps({"step": 4, "split": "val", "eval_loss": 3.5, "perplexity": 33.1}) + "\n",
    )
    more = sync_run_dir(store, run_dir)
    assert more.new_lines == 2 and more.last_step == 4
    assert store.get_metrics(rec.id, keys=["loss"], since_step=3)["loss"][0][0] == 4
    assert store.get_eval(rec.id)["val"]["eval_loss"] == [(4, 3.5)]
    assert store.get_ingest_state(rec.id, "metrics.jsonl").line_no == 5
    assert store.count_rows(rec.id)["metrics"] == 4 * 8


def test_partial_last_line_waits_for_its_newline(store_url, run_dir):
    store = RunStore(store_url)
    line = _train_line(4)
    _write(run_dir / "metrics.jsonl", line[:20])  # the trainer is in the middle of writing
    res = sync_run_dir(store, run_dir)
    assert res.partial_line and res.new_lines == 3 and res.last_step == 3
    assert [p["kind"] for p in res.problems] == ["partial_line"]
    assert res.problems[0]["level"] == "warning" and res.problems[0]["line"] == 4
    _write(run_dir / "metrics.jsonl", line[20:] + "\n")
    res = sync_run_dir(store, run_dir)
    assert not res.partial_line and res.new_lines == 1 and res.last_step == 4 and res.problems == []
    rid = store.get_run("exp1").id
    assert [s for s, _ in store.get_metrics(rid, keys=["loss"])["loss"]] == [1, 2, 3, 4]


def test_corrupt_lines_are_reported_and_kept(store_url, run_dir):
    store = RunStore(store_url)
    _write(run_dir / "metrics.jsonl", "{not json\n" + json.dumps({"loss": 1.0}) + "\n")
    _write(
        run_dir / "metrics.jsonl",
        json.dumps({"step": 6, "expert_load": "oops"}) + "\n" + _train_line(7) + "\n",
    )
    res = sync_run_dir(store, run_dir)
    kinds = [(p["kind"], p["line"]) for p in res.problems]
    assert kinds == [("bad_json", 4), ("bad_record", 5), ("bad_record", 6)]
    assert "line 4 is not valid JSON" in res.problems[0]["message"]
    assert res.last_step == 7
    # the problems stay visible on later syncs (the dashboard keeps showing them)
    assert [p["kind"] for p in sync_run_dir(store, run_dir).problems] == [
        "bad_json",
        "bad_record",
        "bad_record",
    ]


def test_rewritten_file_is_read_again(store_url, run_dir):
    store = RunStore(store_url)
    sync_run_dir(store, run_dir)
    (run_dir / "metrics.jsonl").write_text(_train_line(1) + "\n")  # a fresh run with the same name
    res = sync_run_dir(store, run_dir)
    assert res.new_lines == 1 and res.last_step == 1
    rid = store.get_run("exp1").id
    assert store.get_metrics(rid, keys=["loss"])["loss"] == [(1, pytest.approx(3.99))]  # old steps 2, 3 gone
    assert store.get_routing(rid).steps == [1]


def test_routing_jsonl_and_summary(store_url, run_dir):
    store = RunStore(store_url)
    layer = {
        "layer": 0,
        "load_fractions": [0.25, 0.25, 0.25, 0.25],
        "expert_counts": [4, 4, 4, 4],
        "cv": 0.0,
        "entropy_normalized": 0.97,
        "drop_rate": 0.0,
        "co_selection": [[0, 1], [1, 0]],
    }
    _write(
        run_dir / "routing.jsonl", json.dumps({"step": 2, "layers": [layer, {**layer, "layer": 1}]}) + "\n"
    )
    (run_dir / "summary.json").write_text(json.dumps({"final_loss": 3.9, "steps": 3}))
    res = sync_run_dir(store, run_dir)
    assert res.problems == []
    rec = store.get_run("exp1")
    assert rec.status == "finished" and rec.summary == {"final_loss": 3.9, "steps": 3}
    stats = dict(store.get_layer_stats(rec.id))
    assert stats[2][0]["entropy_normalized"] == 0.97 and "co_selection" not in stats[2][0]
    hist = store.get_routing(rec.id)
    assert hist.count[hist.steps.index(2)] == [[4] * 4] * 2  # routing.jsonl (with counts) overrides step 2
    assert hist.load[hist.steps.index(2)] == [[0.25] * 4] * 2


def test_bad_config_summary_and_missing_dir(store_url, tmp_path, run_dir):
    store = RunStore(store_url)
    (run_dir / "config.yaml").write_text("model: [unclosed\n")
    (run_dir / "summary.json").write_text("{")
    res = sync_run_dir(store, run_dir)
    assert {p["kind"] for p in res.problems} == {"bad_config", "bad_summary"}
    assert res.new_lines == 3  # metrics are still imported
    missing = sync_run_dir(store, tmp_path / "nope")
    assert missing.run_id is None and missing.problems[0]["kind"] == "missing"


def test_sync_runs_dir(store_url, tmp_path, run_dir):
    store = RunStore(store_url)
    other = run_dir.parent / "exp2"
    other.mkdir()
    _write(other / "metrics.jsonl", _train_line(1) + "\n")
    (run_dir.parent / "not-a-run").mkdir()
    results = sync_runs_dir(store, run_dir.parent)
    assert [r.name for r in results] == ["exp1", "exp2"]
    assert [r.name for r in store.list_runs()] == ["exp1", "exp2"]
    with pytest.raises(FileNotFoundError, match="runs directory not found"):
        sync_runs_dir(store, tmp_path / "missing")
