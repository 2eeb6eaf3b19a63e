"""End to end: `moe-lab train` on the bundled corpus with a tiny model; the validation loss falls below
the unigram baseline; `moe-lab eval` reproduces the final number; resume continues the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "moe_lab.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_tiny_model_learns_default_corpus(tmp_path):
    args = [
        "train",
        "--preset",
        "tiny",
        "--name",
        "e2e",
        "--set",
        "data.max_bytes=300000",
        "--set",
        "data.seq_len=64",
        "--set",
        "train.max_steps=120",
        "--set",
        "train.batch_size=16",
        "--set",
        "train.learning_rate=0.004",
        "--set",
        "train.warmup_steps=10",
        "--set",
        "train.eval_every=40",
        "--set",
        "train.eval_batches=8",
        "--set",
        "train.checkpoint_every=60",
    ]
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "e2e"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in lines if m.get("split") == "val"]
    train = [m["lm_loss"] for m in lines if "lm_loss" in m]
    assert len(evals) == 3 and evals[0] > evals[-1]
    assert sum(train[-10:]) / 10 < sum(train[:10]) / 10 - 1.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_loss"] < summary["unigram_val_loss"], summary
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-120", "step-60"]

    # eval of the newest checkpoint over the same batches gives the same loss as the final evaluation
    proc = cli("eval", str(run), "--json", "--max-batches", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)

    # resume to train longer
    proc = cli("train", "--resume", str(run), "--set", "train.max_steps=130", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 130
