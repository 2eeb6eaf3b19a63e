"""Several processes writing one run store at once lose no rows (SQLite WAL + retries; PostgreSQL)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from moe_lab.tracking import RunStore

pytestmark = pytest.mark.integration

WORKERS = 4
STEPS = 50  # per worker; every step is its own transaction (metrics + routing)
LAYERS, EXPERTS = 2, 4

_WORKER = textwrap.dedent(
    """
    import pathlib, sys, time
    from moe_lab.tracking import RunStore

    url, worker, steps, barrier = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4])
    (barrier / f"ready-{worker}").touch()
    deadline = time.time() + 90
    while len(list(barrier.glob("ready-*"))) < int(sys.argv[5]):  # start together: schema creation races too
        if time.time() > deadline:
            sys.exit("barrier timeout")
        time.sleep(0.005)
    store = RunStore(url)
    shared = store.create_run("shared")    # the same run from every process
    own = store.create_run(f"worker-{worker}")
    for i in range(steps):
        step = worker * 100000 + i
        store.log_step(shared, step, {"loss": float(i), "lr": 0.1, "w": float(worker)},
                       loads=[[0.25] * 4, [0.25] * 4])
        store.log_metrics(own, i, {"loss": float(i)})
        if i % 10 == 0:
            store.log_eval(shared, step, {"eval_loss": 1.0})
    store.finish_run(own)
    print("ok", worker)
    """
)


def test_concurrent_writers_lose_no_rows(store_url, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, store_url, str(w), str(STEPS), str(barrier), str(WORKERS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for w in range(WORKERS)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
        assert out.startswith("ok")

    store = RunStore(store_url)
    runs = {r.name: r for r in store.list_runs()}
    assert sorted(runs) == ["shared"] + [f"worker-{w}" for w in range(WORKERS)]
    counts = store.count_rows(runs["shared"].id)
    assert counts["metrics"] == WORKERS * STEPS * 3
    assert counts["routing_stats"] == WORKERS * STEPS * LAYERS * EXPERTS
    assert counts["eval_metrics"] == WORKERS * len(range(0, STEPS, 10))
    for w in range(WORKERS):
        rec = runs[f"worker-{w}"]
        assert rec.status == "finished" and rec.last_step == STEPS - 1
        assert len(store.get_metrics(rec.id)["loss"]) == STEPS
    steps = [s for s, _ in store.get_metrics(runs["shared"].id, keys=["w"])["w"]]
    assert len(steps) == len(set(steps)) == WORKERS * STEPS
