"""Run directory layout and the ``metrics.jsonl`` writer.

::

    runs/<name>/
      config.yaml          the exact RunConfig that ran
      tokenizer.json       the tokenizer (or tokenizer.txt holding "byte")
      checkpoints/step-N/  model.safetensors, optimizer.pt, rng_state.pt, trainer_state.json, COMPLETE
      metrics.jsonl        one JSON object per line (train steps and eval lines)
      summary.json         final numbers
      reports/             analytics output

Example:
    >>> import tempfile
    >>> from moe_lab.train.rundir import RunDir
    >>> rd = RunDir.create(tempfile.mkdtemp() + "/demo")
    >>> rd.metrics_path.name
    'metrics.jsonl'
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import IO, Any

from moe_lab.config import atomic_write_text

__all__ = ["MetricsWriter", "RunDir", "RunExistsError", "default_run_name", "jsonable", "read_metrics"]

_RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "summary.json", "trainer_state.json")


class RunExistsError(ValueError):
    """The run directory already exists and ``overwrite`` was not given."""


def default_run_name() -> str:
    """A time-stamped run name like ``run-20250101-120000``."""
    return time.strftime("run-%Y%m%d-%H%M%S")


def jsonable(value: Any) -> Any:
    """Make numbers JSON-safe (NaN/inf -> None) recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class RunDir:
    """Paths of one run directory; :meth:`create` makes it (safely replacing an old run on request)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def reports_dir(self) -> Path:
        return self.path / "reports"

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def tokenizer_name_path(self) -> Path:
        return self.path / "tokenizer.txt"

    def looks_like_run(self) -> bool:
        """True when the folder holds files a run writes (so it is safe to delete on ``overwrite``)."""
        return self.path.is_dir() and any((self.path / m).exists() for m in _RUN_MARKERS)

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, overwrite: bool = False) -> RunDir:
        """Make a fresh run directory.

        An existing non-empty folder is an error unless ``overwrite``; even then, only a folder that looks
        like a run directory (and is not the current directory or one of its parents) is deleted.
        """
        rd = cls(path)
        p = rd.path
        if p.exists() and not p.is_dir():
            raise RunExistsError(f"run directory {p} exists and is not a directory")
        if p.is_dir() and any(p.iterdir()):
            if not overwrite:
                raise RunExistsError(
                    f"run directory {p} already exists; pass --overwrite to replace it or --resume {p} "
                    "to continue it"
                )
            resolved = p.resolve()
            cwd = Path.cwd().resolve()
            if resolved == cwd or resolved in cwd.parents or resolved == Path(resolved.anchor):
                raise RunExistsError(
                    f"refusing to delete {p}: it is the current directory or one of its parents"
                )
            if not rd.looks_like_run():
                raise RunExistsError(f"refusing to delete {p}: it does not look like a moe-lab run directory")
            # Move aside first so a crash mid-delete never leaves a half-deleted run under the real name.
            trash = resolved.with_name(f".{resolved.name}.deleting-{os.getpid()}-{time.time_ns()}")
            os.replace(resolved, trash)
            shutil.rmtree(trash, ignore_errors=True)
        p.mkdir(parents=True, exist_ok=True)
        rd.checkpoints_dir.mkdir(exist_ok=True)
        return rd

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` atomically."""
        atomic_write_text(self.summary_path, json.dumps(jsonable(summary), indent=2) + "\n")

    def read_summary(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.summary_path.read_text(encoding="utf-8"))
        return data


class MetricsWriter:
    """Append JSON lines to ``metrics.jsonl`` (one object per line, flushed after each write).

    >>> import tempfile, json, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
    >>> with MetricsWriter(p) as w:
    ...     w.write({"step": 1, "loss": 2.5})
    >>> json.loads(p.read_text())["loss"]
    2.5
    """

    def __init__(self, path: str | os.PathLike[str], *, truncate_after_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            self._truncate(truncate_after_step)
        self._fh: IO[str] | None = self.path.open("a", encoding="utf-8")

    def _truncate(self, step: int) -> None:
        """Drop lines logged after ``step`` (a resume replays those steps)."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(obj, dict) and int(obj.get("step", 0)) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            raise ValueError(f"metrics writer for {self.path} is closed")
        self._fh.write(json.dumps(jsonable(record)) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All well-formed lines of a ``metrics.jsonl``."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out
