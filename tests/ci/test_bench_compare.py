"""benchmarks/compare.py: ratio comparison against the baseline, regressions, missing records, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "compare.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def baseline(tmp_path: Path) -> Path:
    return write(
        tmp_path / "baseline.json",
        {
            "threshold": 0.2,
            "benchmarks": {
                "moe_layer": [
                    {"name": "grouped_vs_loop", "ratio": 4.0, "higher_is_better": True},
                    {"name": "memory_ratio", "ratio": 1.0, "higher_is_better": False, "threshold": 0.5},
                ]
            },
        },
    )


def results(tmp_path: Path, speedup: float, memory: float, name: str = "moe_layer") -> Path:
    return write(
        tmp_path / f"{name}.json",
        [
            {"name": "grouped_vs_loop", "ratio": speedup, "higher_is_better": True},
            {"name": "memory_ratio", "ratio": memory, "higher_is_better": False},
        ],
    )


def test_within_threshold_passes(repo: Path, tmp_path: Path, baseline: Path) -> None:
    # 3.3 is -17.5 % (threshold 20 %); memory 1.45 is +45 % (record threshold 50 %).
    out = run(repo, "--baseline", str(baseline), str(results(tmp_path, 3.3, 1.45)))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no regression" in out.stdout


def test_higher_is_better_regression_fails(repo: Path, tmp_path: Path, baseline: Path) -> None:
    out = run(repo, "--baseline", str(baseline), str(results(tmp_path, 3.1, 1.0)))
    assert out.returncode == 1
    assert "moe_layer/grouped_vs_loop" in out.stdout and "REGRESSION" in out.stdout


def test_lower_is_better_regression_uses_record_threshold(repo: Path, tmp_path: Path, baseline: Path) -> None:
    out = run(repo, "--baseline", str(baseline), str(results(tmp_path, 4.0, 1.6)))
    assert out.returncode == 1
    assert "memory_ratio" in out.stdout and "REGRESSION" in out.stdout
    # An improvement is never a regression, however large.
    assert run(repo, "--baseline", str(baseline), str(results(tmp_path, 40.0, 0.01))).returncode == 0


def test_threshold_override(repo: Path, tmp_path: Path, baseline: Path) -> None:
    res = results(tmp_path, 3.1, 1.0)
    assert run(repo, "--baseline", str(baseline), "--threshold", "0.3", str(res)).returncode == 0


def test_missing_record_fails_and_unknown_benchmark_is_reported(
    repo: Path, tmp_path: Path, baseline: Path
) -> None:
    partial = write(
        tmp_path / "moe_layer.json", [{"name": "grouped_vs_loop", "ratio": 4.0, "higher_is_better": True}]
    )
    out = run(repo, "--baseline", str(baseline), str(partial))
    assert out.returncode == 1
    assert "memory_ratio: missing from the results" in out.stdout
    other = write(
        tmp_path / "train_step.json", {"records": [{"name": "x", "ratio": 2.0, "higher_is_better": True}]}
    )
    out = run(repo, "--baseline", str(baseline), str(other))
    assert out.returncode == 0
    assert "train_step: no baseline" in out.stdout


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"nope": []}, "expected a list of records"),
        ([{"name": "a", "ratio": "fast", "higher_is_better": True}], "ratio (a): expected a finite number"),
        ([{"name": "a", "ratio": -1, "higher_is_better": True}], "expected a positive ratio"),
        ([{"name": "a", "ratio": 1.0}], "higher_is_better (a): expected true or false"),
        ([{"ratio": 1.0, "higher_is_better": True}], ".name: expected a non-empty string"),
        ([{"name": "a", "ratio": 1, "higher_is_better": True}] * 2, "duplicate record 'a'"),
    ],
)
def test_malformed_results_are_clear_errors(
    repo: Path, tmp_path: Path, baseline: Path, payload: object, message: str
) -> None:
    out = run(repo, "--baseline", str(baseline), str(write(tmp_path / "moe_layer.json", payload)))
    assert out.returncode == 2
    assert message in out.stderr and "moe_layer.json" in out.stderr


def test_invalid_json_and_missing_file(repo: Path, tmp_path: Path, baseline: Path) -> None:
    bad = tmp_path / "moe_layer.json"
    bad.write_text("{not json")
    out = run(repo, "--baseline", str(baseline), str(bad))
    assert out.returncode == 2 and "invalid JSON" in out.stderr
    out = run(repo, "--baseline", str(tmp_path / "none.json"), str(bad))
    assert out.returncode == 2 and "file not found" in out.stderr


def test_update_rewrites_the_benchmark_and_keeps_record_thresholds(
    repo: Path, tmp_path: Path, baseline: Path
) -> None:
    out = run(repo, "--baseline", str(baseline), "--update", str(results(tmp_path, 5.0, 0.9)))
    assert out.returncode == 0, out.stderr
    data = json.loads(baseline.read_text())
    assert data["threshold"] == 0.2
    recs = {r["name"]: r for r in data["benchmarks"]["moe_layer"]}
    assert recs["grouped_vs_loop"]["ratio"] == 5.0
    assert recs["memory_ratio"] == {
        "name": "memory_ratio",
        "ratio": 0.9,
        "higher_is_better": False,
        "threshold": 0.5,
    }
    # The refreshed baseline accepts the results it was made from.
    assert run(repo, "--baseline", str(baseline), str(results(tmp_path, 5.0, 0.9))).returncode == 0


def test_committed_baseline_is_valid(repo: Path, tmp_path: Path) -> None:
    empty = write(tmp_path / "unlisted_benchmark.json", [])
    out = run(repo, "--baseline", str(repo / "benchmarks" / "baseline.json"), str(empty))
    assert out.returncode == 0, out.stderr
