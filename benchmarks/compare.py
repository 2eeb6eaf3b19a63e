"""Compare benchmark ratios with the committed baseline; fail on a regression beyond a threshold.

Each benchmark script (`benchmarks/NAME.py --out FILE`) writes a JSON file holding a list of records,
or an object whose `records` (or `results`) key holds that list::

    [{"name": "moe_layer/grouped_vs_loop", "ratio": 3.1, "higher_is_better": true}, ...]

A ratio is measured within one run (e.g. reference time / fast-path time on the same machine), so the
speed of the machine cancels out. The baseline (`benchmarks/baseline.json`) groups records per
benchmark, named after the result file's stem::

    {"threshold": 0.25, "benchmarks": {"moe_layer": [{"name": ..., "ratio": ..., "higher_is_better": ...,
                                                      "threshold": 0.4}]}}

`threshold` is a relative change: with 0.25, a higher-is-better ratio regresses below 0.75 x baseline and
a lower-is-better one above 1.25 x baseline. A record's own `threshold` overrides the default.

Usage:
    python benchmarks/compare.py --baseline benchmarks/baseline.json bench-results/*.json
    python benchmarks/compare.py --baseline benchmarks/baseline.json --update bench-results/*.json

Exit status: 0 no regression, 1 regression or missing record, 2 unreadable or malformed input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_THRESHOLD = 0.25


class InputError(Exception):
    """A result or baseline file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Record:
    name: str
    ratio: float
    higher_is_better: bool
    threshold: float | None = None


def parse_records(data: object, where: str) -> list[Record]:
    """Validate a list of records (or {"records": [...]}) and return them."""
    if isinstance(data, dict):
        for key in ("records", "results"):
            if key in data:
                data = data[key]
                break
        else:
            raise InputError(f"{where}: expected a list of records or an object with a 'records' list")
    if not isinstance(data, list):
        raise InputError(f"{where}: expected a list of records, got {type(data).__name__}")
    records = []
    seen: set[str] = set()
    for i, item in enumerate(data):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise InputError(f"{at}: expected an object with name, ratio, higher_is_better")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InputError(f"{at}.name: expected a non-empty string")
        ratio = item.get("ratio")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
            raise InputError(f"{at}.ratio ({name}): expected a finite number, got {ratio!r}")
        if ratio <= 0:
            raise InputError(f"{at}.ratio ({name}): expected a positive ratio, got {ratio!r}")
        hib = item.get("higher_is_better")
        if not isinstance(hib, bool):
            raise InputError(f"{at}.higher_is_better ({name}): expected true or false, got {hib!r}")
        threshold = item.get("threshold")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 10
        ):
            raise InputError(f"{at}.threshold ({name}): expected a number in (0, 10), got {threshold!r}")
        if name in seen:
            raise InputError(f"{at}.name: duplicate record {name!r}")
        seen.add(name)
        records.append(Record(name, float(ratio), hib, None if threshold is None else float(threshold)))
    return records


def load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: invalid JSON ({err})") from None


def load_baseline(path: Path) -> tuple[float, dict[str, list[Record]]]:
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
        raise InputError(f"{path}: expected an object with a 'benchmarks' mapping")
    threshold = data.get("threshold", DEFAULT_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 10:
        raise InputError(f"{path}.threshold: expected a number in (0, 10), got {threshold!r}")
    groups = {
        name: parse_records(recs, f"{path}.benchmarks.{name}") for name, recs in data["benchmarks"].items()
    }
    return float(threshold), groups


def is_regression(base: Record, current: Record, threshold: float) -> bool:
    if base.higher_is_better:
        return current.ratio < base.ratio * (1 - threshold)
    return current.ratio > base.ratio * (1 + threshold)


def compare(
    baseline: dict[str, list[Record]], results: dict[str, list[Record]], default_threshold: float
) -> tuple[list[str], list[str]]:
    """Return (report lines, failure lines) for the benchmarks present in `results`."""
    report, failures = [], []
    for bench, current in sorted(results.items()):
        by_name = {r.name: r for r in current}
        base_records = baseline.get(bench)
        if base_records is None:
            report.append(f"{bench}: no baseline ({len(current)} records not compared)")
            continue
        for base in base_records:
            label = base.name if base.name.startswith(f"{bench}/") else f"{bench}/{base.name}"
            threshold = base.threshold if base.threshold is not None else default_threshold
            cur = by_name.pop(base.name, None)
            if cur is None:
                failures.append(f"{label}: missing from the results")
                continue
            if cur.higher_is_better != base.higher_is_better:
                failures.append(f"{label}: higher_is_better differs from the baseline")
                continue
            change = cur.ratio / base.ratio - 1
            line = (
                f"{label}: {cur.ratio:.3f} vs baseline {base.ratio:.3f} "
                f"({change:+.1%}, {'higher' if base.higher_is_better else 'lower'} is better, "
                f"threshold {threshold:.0%})"
            )
            if is_regression(base, cur, threshold):
                failures.append(line + " REGRESSION")
            else:
                report.append(line + " ok")
        report.extend(f"{bench}/{name}: no baseline record (not compared)" for name in sorted(by_name))
    return report, failures


def updated_baseline(
    old_threshold: float, old: dict[str, list[Record]], results: dict[str, list[Record]], note: str = ""
) -> dict[str, object]:
    """The baseline with the benchmarks in `results` replaced; per-record thresholds are kept."""
    groups = dict(old)
    for bench, current in results.items():
        kept = {r.name: r.threshold for r in old.get(bench, [])}
        groups[bench] = [Record(r.name, r.ratio, r.higher_is_better, kept.get(r.name)) for r in current]
    out: dict[str, object] = {"threshold": old_threshold, "benchmarks": {}}
    if note:
        out = {"note": note, **out}
    for bench in sorted(groups):
        recs = []
        for r in groups[bench]:
            item: dict[str, object] = {
                "name": r.name,
                "ratio": round(r.ratio, 4),
                "higher_is_better": r.higher_is_better,
            }
            if r.threshold is not None:
                item["threshold"] = r.threshold
            recs.append(item)
        out["benchmarks"][bench] = recs  # type: ignore[index]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="result JSON files (benchmark = file stem)")
    parser.add_argument("--baseline", type=Path, default=Path(__file__).with_name("baseline.json"))
    parser.add_argument("--threshold", type=float, help="override the baseline's default threshold")
    parser.add_argument("--update", action="store_true", help="rewrite the baseline from these results")
    args = parser.parse_args(argv)
    try:
        if args.update and not args.baseline.exists():
            threshold, baseline = DEFAULT_THRESHOLD, {}
        else:
            threshold, baseline = load_baseline(args.baseline)
        if args.threshold is not None:
            if not 0 < args.threshold < 10:
                raise InputError(f"--threshold: expected a number in (0, 10), got {args.threshold}")
            threshold = args.threshold
        results = {p.stem: parse_records(load_json(p), str(p)) for p in args.results}
    except InputError as err:
        print(f"compare: error: {err}", file=sys.stderr)
        return 2
    if args.update:
        note = "Refreshed with `make bench-baseline` (quick mode); see docs/workflows/performance.md."
        data = updated_baseline(threshold, baseline, results, note)
        tmp = args.baseline.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        tmp.replace(args.baseline)
        print(f"compare: wrote {args.baseline} ({', '.join(sorted(results))})")
        return 0
    report, failures = compare(baseline, results, threshold)
    for line in report:
        print(line)
    for line in failures:
        print(line)
    if failures:
        print(f"compare: {len(failures)} regression(s) or missing record(s)", file=sys.stderr)
        return 1
    print("compare: no regression")
    return 0


if __name__ == "__main__":
    sys.exit(main())
