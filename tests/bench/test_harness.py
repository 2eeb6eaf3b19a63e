"""The benchmark harness: rotation order, timing statistics, records compare.py accepts, RESULTS.md appends."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_lab.bench import (
    PeakMemory,
    Timing,
    append_results,
    markdown_table,
    record,
    rotate,
    time_fn,
    write_records,
)
from moe_lab.bench.generate import bench_generate, run_once
from moe_lab.models import MoEModel

ROOT = Path(__file__).resolve().parents[2]


def test_rotate_interleaves_and_skips_warmup_in_samples() -> None:
    calls: list[str] = []
    t = rotate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(t[n].samples_s) for n in "ab"] == [3, 3]


def test_timing_statistics_match_plain_formulas() -> None:
    t = Timing("x", [0.3, 0.1, 0.2, 0.6])
    assert t.median_s == pytest.approx(0.25)
    assert t.min_s == 0.1
    assert t.mean_s == pytest.approx(0.3)
    assert t.to_dict()["reps"] == 4


def test_time_fn_measures_sleep() -> None:
    t = time_fn(lambda: time.sleep(0.01), reps=2, warmup=0)
    assert 0.009 < t.min_s < 1.0


def test_rotate_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="reps"):
        rotate({"a": lambda: None}, reps=0)
    with pytest.raises(ValueError, match="at least one"):
        rotate({}, reps=1)


def test_peak_memory_sees_an_allocation() -> None:
    with PeakMemory() as small:
        _ = bytearray(10)
    with PeakMemory() as big:
        _ = bytearray(5_000_000)
    assert big.peak_bytes >= 5_000_000 > small.peak_bytes


def _compare_module():  # benchmarks/compare.py is a script, not a package module
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "benchmarks" / "compare.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_compare"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_records_are_what_compare_py_reads(tmp_path: Path) -> None:
    recs = [record("gen/ours_vs_hf", 1.7, higher_is_better=True), record("x/t", 0.5, higher_is_better=False)]
    path = write_records(tmp_path / "r.json", recs)
    parsed = _compare_module().parse_records(json.loads(path.read_text()), str(path))
    assert [(r.name, r.ratio, r.higher_is_better) for r in parsed] == [
        ("gen/ours_vs_hf", 1.7, True),
        ("x/t", 0.5, False),
    ]


@pytest.mark.parametrize("ratio", [0.0, -1.0, float("nan"), float("inf")])
def test_record_rejects_non_positive_or_non_finite(ratio: float) -> None:
    with pytest.raises(ValueError, match="ratio"):
        record("r", ratio, higher_is_better=True)


def test_write_records_rejects_duplicates(tmp_path: Path) -> None:
    r = record("same", 1.0, higher_is_better=True)
    with pytest.raises(ValueError, match="duplicate"):
        write_records(tmp_path / "r.json", [r, r])


def test_append_results_appends_only(tmp_path: Path) -> None:
    md = tmp_path / "RESULTS.md"
    append_results(md, "First", "python a.py", markdown_table(["a", "b"], [[1, 0.12345]]))
    first = md.read_text()
    assert first.startswith("# Benchmark results\n") and "| 1 | 0.123 |" in first
    append_results(md, "Second", "python b.py", "body")
    text = md.read_text()
    assert text.startswith(first) and "## Second" in text and "Command: `python b.py`" in text


def test_run_once_decode_equals_generate() -> None:
    """The benchmark's decode loop produces the same greedy tokens as generate() (the same path)."""
    from moe_lab.inference.generate import generate

    torch.manual_seed(0)
    model = MoEModel.from_preset("tiny").eval()
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    _, _, toks = run_once(model, ids, 5)
    ref = generate(model, ids, max_new_tokens=5)
    assert torch.equal(toks, ref.sequences[:, 7:])


def test_bench_generate_variants_agree_on_tokens() -> None:
    """cached experts give the same tokens as eager (exact offloading); rows cover every variant."""
    torch.manual_seed(0)
    model = MoEModel.from_preset("tiny").eval()
    rows = bench_generate(model, batch_sizes=[1], prompt_lengths=[6], new_tokens=3,
                          variants=["eager", "cached"], reps=1, warmup=0)  # fmt: skip
    assert [r["variant"] for r in rows] == ["eager", "cached"]
    assert rows[0]["speedup_vs_eager"] == 1.0
    from moe_lab.bench.generate import build_variant

    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    eager = build_variant(model, "eager")
    cached = build_variant(model, "cached")
    try:
        assert torch.equal(run_once(eager.module, ids, 4)[2], run_once(cached.module, ids, 4)[2])
    finally:
        cached.close()
