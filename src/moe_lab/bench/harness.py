"""Timers, rotation, peak memory, JSON records and RESULTS.md sections (see :mod:`moe_lab.bench`)."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PeakMemory",
    "Timing",
    "append_results",
    "machine_note",
    "markdown_table",
    "record",
    "rotate",
    "time_fn",
    "write_records",
]


@dataclass
class Timing:
    """Wall-clock samples of one implementation, in seconds (warm-up runs excluded)."""

    name: str
    samples_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s) if self.samples_s else math.nan

    @property
    def min_s(self) -> float:
        return min(self.samples_s) if self.samples_s else math.nan

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.samples_s) if self.samples_s else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "median_s": self.median_s,
            "min_s": self.min_s,
            "mean_s": self.mean_s,
            "reps": len(self.samples_s),
        }


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], *, reps: int = 5, warmup: int = 1, name: str = "fn") -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``reps`` times timed (CUDA synchronised around each)."""
    return rotate({name: fn}, reps=reps, warmup=warmup)[name]


def rotate(impls: Mapping[str, Callable[[], Any]], *, reps: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Time several implementations in rotation: warm-up each, then ``A B C A B C ...`` ``reps`` rounds.

    Interleaving spreads slow phases of a shared machine over all contenders, so their ratio stays
    meaningful even when absolute times drift.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    if not impls:
        raise ValueError("rotate() needs at least one implementation")
    for fn in impls.values():
        for _ in range(warmup):
            fn()
    out = {name: Timing(name) for name in impls}
    for _ in range(reps):
        for name, fn in impls.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            out[name].samples_s.append(time.perf_counter() - t0)
    return out


def _rss_bytes() -> int | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency of the dev env
        return None
    return int(psutil.Process(os.getpid()).memory_info().rss)


class PeakMemory:
    """Context manager measuring the peak memory of a block.

    On CUDA (``device="cuda"``) ``peak_bytes`` is ``torch.cuda.max_memory_allocated`` during the block.
    On CPU it is the peak of Python-level allocations seen by ``tracemalloc`` (torch tensors allocate
    through their own allocator, so this undercounts them) and ``rss_delta_bytes`` is the growth of the
    process resident set (psutil) from entry to exit: use both as indications, not exact figures.

    Example:
        >>> with PeakMemory() as pm:
        ...     _ = [0] * 100_000
        >>> pm.peak_bytes > 0
        True
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.rss_delta_bytes: int | None = None
        self._rss0: int | None = None
        self._started_tracemalloc = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            if not tracemalloc.is_tracing():
                tracemalloc.start()
                self._started_tracemalloc = True
            tracemalloc.reset_peak()
        self._rss0 = _rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak_bytes = int(tracemalloc.get_traced_memory()[1])
            if self._started_tracemalloc:
                tracemalloc.stop()
        rss1 = _rss_bytes()
        if rss1 is not None and self._rss0 is not None:
            self.rss_delta_bytes = rss1 - self._rss0


def record(name: str, ratio: float, *, higher_is_better: bool, **extra: Any) -> dict[str, Any]:
    """One record for ``benchmarks/compare.py``; ``ratio`` must be a positive finite number."""
    if not name:
        raise ValueError("record name must be a non-empty string")
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"record {name!r}: ratio must be a positive finite number, got {ratio!r}")
    return {"name": name, "ratio": float(ratio), "higher_is_better": bool(higher_is_better), **extra}


def write_records(path: str | os.PathLike[str], records: Sequence[Mapping[str, Any]]) -> Path:
    """Write records as a JSON list (atomically); duplicate names are an error (compare.py rejects them)."""
    names = [r["name"] for r in records]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate benchmark record names: {sorted(dup)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(list(records), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are shown with 3 significant decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_note() -> str:
    """One line describing the machine: CPU count, torch threads, load average, torch version, device."""
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux/macOS
        load = "n/a"
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (
        f"{platform.machine()} {os.cpu_count()} CPUs ({dev}), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, load average {load} when written (shared machine: other processes running)"
    )


def appending_enabled() -> bool:
    """False when ``MOE_LAB_BENCH_NO_APPEND`` is set to a non-empty value other than ``0``.

    ``make bench-compare`` / ``make bench-baseline`` set it: their quick runs feed ``benchmarks/compare.py``
    and must not add sections to ``benchmarks/RESULTS.md``.

    >>> import os
    >>> os.environ["MOE_LAB_BENCH_NO_APPEND"] = "1"; appending_enabled()
    False
    >>> del os.environ["MOE_LAB_BENCH_NO_APPEND"]; appending_enabled()
    True
    """
    return os.environ.get("MOE_LAB_BENCH_NO_APPEND", "") in ("", "0")


def append_results(
    path: str | os.PathLike[str], title: str, command: str, body: str, notes: str = ""
) -> Path:
    """Append a dated section to a RESULTS.md file (created with a ``# Benchmark results`` header).

    Writes nothing when the environment sets ``MOE_LAB_BENCH_NO_APPEND`` (see :func:`appending_enabled`).
    """
    path = Path(path)
    if not appending_enabled():
        return path
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Benchmark results\n", encoding="utf-8")
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"\n## {title} ({date})\n",
        f"Command: `{command}`\n",
        f"Machine: {machine_note()}\n",
        body.strip(),
    ]
    if notes:
        parts.append("\n" + notes.strip())
    with path.open("a", encoding="utf-8") as fh:
        fh.write("\n".join(parts) + "\n")
    return path
