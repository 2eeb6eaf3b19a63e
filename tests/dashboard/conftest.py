"""Synthetic run directories for the dashboard API tests (same line format as the trainer writes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def train_line(step: int, layers: int = 2, experts: int = 4) -> dict:
    skew = 1.0 / (1 + step)
    loads = [[(1 + skew * ((e + layer) % experts)) for e in range(experts)] for layer in range(layers)]
    loads = [[x / sum(row) for x in row] for row in loads]
    return {
        "step": step,
        "loss": 5.0 / math.sqrt(step),
        "lm_loss": 4.9 / math.sqrt(step),
        "aux_loss": 0.01,
        "z_loss": 0.001,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "tokens_per_s": 900.0,
        "expert_load": loads,
        "drop_rate": 0.01,
    }


def write_run(root: Path, name: str, steps: int, eval_every: int = 5, max_steps: int = 100) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"model:\n  num_experts: 4\ntrain:\n  max_steps: {max_steps}\n")
    lines = []
    for s in range(1, steps + 1):
        lines.append(json.dumps(train_line(s)))
        if s % eval_every == 0:
            lines.append(
                json.dumps({"step": s, "split": "val", "eval_loss": 4.0 / math.sqrt(s), "perplexity": 10.0})
            )
    (d / "metrics.jsonl").write_text("".join(x + "\n" for x in lines))
    return d


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    write_run(root, "alpha", 12)
    write_run(root, "beta", 8)
    return root
