"""Benchmark harness shared by ``moe-lab bench`` and the scripts in ``benchmarks/``.

- :func:`time_fn` / :func:`rotate`: wall-clock timing with warm-up; ``rotate`` interleaves implementations
  (A B C A B C ...) so that load changes on a shared machine hit every contender alike; :class:`Timing`
  reports median, min and mean.
- :class:`PeakMemory`: peak memory of a block (``torch.cuda.max_memory_allocated`` on CUDA, else the peak
  of Python allocations via ``tracemalloc`` plus the process RSS growth via ``psutil`` when installed).
- :func:`record` / :func:`write_records`: the JSON records ``benchmarks/compare.py`` reads
  (``{"name": ..., "ratio": ..., "higher_is_better": ...}``); :func:`append_results`: append a section
  to ``benchmarks/RESULTS.md`` (never rewrites what is there).

Example:
    >>> import time
    >>> t = rotate({"a": lambda: None, "b": lambda: time.sleep(0.001)}, reps=3, warmup=1)
    >>> t["a"].median_s < t["b"].median_s
    True
    >>> record("demo/b_over_a", t["b"].median_s / t["a"].median_s, higher_is_better=False)["name"]
    'demo/b_over_a'
"""

from __future__ import annotations

from moe_lab.bench.harness import (
    PeakMemory,
    Timing,
    append_results,
    appending_enabled,
    machine_note,
    markdown_table,
    record,
    rotate,
    time_fn,
    write_records,
)

__all__ = [
    "PeakMemory",
    "Timing",
    "append_results",
    "appending_enabled",
    "machine_note",
    "markdown_table",
    "record",
    "rotate",
    "time_fn",
    "write_records",
]
