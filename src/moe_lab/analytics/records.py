"""Read a run directory's records (``metrics.jsonl``, ``routing.jsonl``, ``summary.json``, ``config.yaml``).

Used by the report, the visualizer and the dashboard. Errors name the file and line.

Example:
    >>> from moe_lab.analytics.records import load_run
    >>> run = load_run("runs/demo")  # doctest: +SKIP
    >>> run.train[-1]["loss"], len(run.routing)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RunData", "RunDirError", "load_run", "read_jsonl", "split_metrics"]


class RunDirError(ValueError):
    """The folder is not a readable run directory (message names the file and what is wrong)."""


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every JSON object of a ``.jsonl`` file.

    A last line without its newline that does not parse is skipped (a writer may be appending right now);
    any other bad line raises :class:`RunDirError` naming ``file:line``.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines):  # unterminated last line: partial write in progress
                break
            raise RunDirError(f"{path}:{i}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise RunDirError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        out.append(obj)
    return out


def split_metrics(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train lines, eval lines)``: eval lines have a ``split`` key or an ``eval_loss``."""
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for r in records:
        (evals if ("split" in r or "eval_loss" in r) else train).append(r)
    return train, evals


@dataclass
class RunData:
    """Everything a report needs from one run directory."""

    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    routing: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read a run directory; raises ``FileNotFoundError`` / :class:`RunDirError` with a clear message."""
    path = Path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise RunDirError(f"{path} is not a directory (expected a run directory with metrics.jsonl)")
    metrics_path, routing_path = path / "metrics.jsonl", path / "routing.jsonl"
    if not metrics_path.is_file() and not routing_path.is_file():
        raise RunDirError(f"{path} is not a run directory: no metrics.jsonl or routing.jsonl in it")
    run = RunData(path=path)
    if metrics_path.is_file():
        run.train, run.eval = split_metrics(read_jsonl(metrics_path))
    if routing_path.is_file():
        run.routing = read_jsonl(routing_path)
        for i, r in enumerate(run.routing, start=1):
            if not isinstance(r.get("layers"), list):
                raise RunDirError(f"{routing_path}: record {i} has no 'layers' list")
    summary_path = path / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RunDirError(f"{summary_path}: not valid JSON ({err.msg})") from None
        run.summary = summary if isinstance(summary, dict) else {}
    config_path = path / "config.yaml"
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise RunDirError(f"{config_path}: not valid YAML ({err})") from None
        run.config = config if isinstance(config, dict) else {}
    return run
