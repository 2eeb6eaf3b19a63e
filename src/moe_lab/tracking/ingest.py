"""Import run directories (``config.yaml``, ``metrics.jsonl``, ``routing.jsonl``, ``summary.json``) into a :class:`RunStore`.

Incremental: the store remembers the byte offset reached in each ``metrics.jsonl``; a sync reads only what
was appended since, and commits the rows together with the new offset. A last line without its newline (the
trainer is writing it) is left for the next sync and reported as ``partial_line``. Lines that are not JSON
objects with an integer ``step`` are skipped and reported (file + line number) in ``problems``, which are kept
in the store so the dashboard keeps showing them. A file that was truncated or replaced is read again from the
start (writes are upserts, so nothing is duplicated).

Example:
    >>> from moe_lab.tracking import RunStore, sync_run_dir
    >>> store = RunStore("sqlite://")
    >>> result = sync_run_dir(store, "runs/does-not-exist")
    >>> result.problems[0]["kind"]
    'missing'
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moe_lab.tracking.store import IngestState, RunStore

__all__ = ["METRICS_FILE", "ROUTING_FILE", "SyncResult", "sync_run_dir", "sync_runs_dir"]

METRICS_FILE = "metrics.jsonl"
ROUTING_FILE = "routing.jsonl"
_BATCH_LINES = 500
_MAX_BYTES_PER_SYNC = 64 * 1024 * 1024
_MAX_KEPT_ERRORS = 20


@dataclass
class SyncResult:
    """What one sync of a run directory did and found."""

    name: str
    run_id: int | None = None
    new_lines: int = 0
    new_rows: int = 0
    last_step: int | None = None
    partial_line: bool = False
    problems: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _problem(
    kind: str, message: str, file: str | None = None, line: int | None = None, level: str = "error"
) -> dict[str, Any]:
    return {"kind": kind, "level": level, "file": file, "line": line, "message": message}


def _read_config(run_dir: Path, problems: list[dict[str, Any]]) -> dict[str, Any] | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        problems.append(
            _problem(
                "bad_config", f"config.yaml is not valid YAML: {str(err).splitlines()[0]}", "config.yaml"
            )
        )
        return None
    if data is not None and not isinstance(data, dict):
        problems.append(_problem("bad_config", "config.yaml must be a mapping of sections", "config.yaml"))
        return None
    return data


def _read_summary(run_dir: Path, problems: list[dict[str, Any]]) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        problems.append(_problem("bad_summary", f"summary.json is not valid JSON: {err}", "summary.json"))
        return None
    if not isinstance(data, dict):
        problems.append(_problem("bad_summary", "summary.json must be a JSON object", "summary.json"))
        return None
    return data


def _parse_line(raw: bytes, line_no: int, file: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(record, None) or (None, problem) for one complete line of ``metrics.jsonl`` / ``routing.jsonl``."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, _problem("bad_json", f"line {line_no} is not valid JSON ({err})", file, line_no)
    if not isinstance(obj, dict):
        return None, _problem("bad_record", f"line {line_no} is not a JSON object", file, line_no)
    step = obj.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        msg = f"line {line_no} has no non-negative integer 'step' (got {step!r})"
        return None, _problem("bad_record", msg, file, line_no)
    if file == METRICS_FILE:
        loads = obj.get("expert_load")
        if loads is not None and not _is_matrix(loads):
            msg = f"line {line_no}: 'expert_load' must be a list (layers) of lists of numbers"
            return None, _problem("bad_record", msg, file, line_no)
    else:
        layers = obj.get("layers")
        if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
            msg = f"line {line_no}: 'layers' must be a list of per-layer objects"
            return None, _problem("bad_record", msg, file, line_no)
        if not _is_matrix([x.get("load_fractions", []) for x in layers]):
            msg = f"line {line_no}: 'load_fractions' must be lists of numbers"
            return None, _problem("bad_record", msg, file, line_no)
    return obj, None


def _is_matrix(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(row, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
        for row in value
    )


class _Batch:
    """Rows of one chunk of lines, in the shape :meth:`RunStore.write_batch` takes."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, Any]]] = []
        self.evals: list[tuple[int, str, dict[str, Any]]] = []
        self.routing: list[tuple[int, Any, Any, Any]] = []
        self.layer_stats: list[tuple[int, list[dict[str, Any]]]] = []

    def add(self, file: str, record: dict[str, Any]) -> None:
        step = int(record["step"])
        if file == ROUTING_FILE:
            layers = record["layers"]
            loads = [x.get("load_fractions") or [] for x in layers]
            counts = [x.get("expert_counts") for x in layers]
            ok_counts = all(_is_matrix([c]) and len(c) == len(ld) for c, ld in zip(counts, loads))
            if any(loads):
                self.routing.append((step, loads, counts if ok_counts else None, None))
            self.layer_stats.append((step, [{k: v for k, v in x.items() if k != "layer"} for x in layers]))
        elif "split" in record or "eval_loss" in record:
            split = str(record.get("split", "val"))
            self.evals.append((step, split, {k: v for k, v in record.items() if k not in ("step", "split")}))
        else:
            self.metrics.append((step, {k: v for k, v in record.items() if k not in ("step", "expert_load")}))
            if record.get("expert_load"):
                self.routing.append((step, record["expert_load"], None, None))


def _file_identity(path: Path) -> tuple[str, str]:
    st = path.stat()
    with path.open("rb") as fh:
        head = fh.read(64)
    return f"{st.st_dev}:{st.st_ino}", head.hex()


def sync_run_dir(store: RunStore, run_dir: str | os.PathLike[str], *, name: str | None = None) -> SyncResult:
    """Bring the store up to date with one run directory; never raises for bad files (see ``problems``)."""
    rdir = Path(run_dir)
    result = SyncResult(name=name or rdir.name)
    if not rdir.is_dir():
        result.problems.append(_problem("missing", f"run directory {rdir} does not exist"))
        return result
    problems: list[dict[str, Any]] = []
    config = _read_config(rdir, problems)
    summary = _read_summary(rdir, problems)
    metrics_path = rdir / METRICS_FILE

    existing = store.find_run(result.name)
    if existing is None:
        status = "finished" if summary is not None else "running"
        run_id = store.create_run(result.name, config=config, run_dir=str(rdir.resolve()), status=status)
    else:
        run_id = existing.id
        if config is not None and existing.config != config:
            store.create_run(result.name, config=config, status=existing.status)
    result.run_id = run_id

    kept_errors: list[dict[str, Any]] = []
    for file in (METRICS_FILE, ROUTING_FILE):
        path = rdir / file
        if not path.is_file():
            continue
        try:
            state = _sync_jsonl(store, run_id, path, result)
        except OSError as err:
            problems.append(_problem("unreadable", f"cannot read {file}: {err.strerror or err}", file))
            continue
        kept_errors += state.errors or []
        if file == METRICS_FILE:
            result.last_step = state.last_step
    if not metrics_path.is_file():
        problems.append(_problem("no_metrics", f"no {METRICS_FILE} yet", METRICS_FILE, level="warning"))

    if summary is not None:
        status = str(summary.get("status", "finished"))
        if existing is None or existing.status != status or existing.summary != summary:
            store.finish_run(run_id, status=status, summary=summary)
    result.problems = problems + kept_errors + result.problems
    return result


def _sync_jsonl(store: RunStore, run_id: int, path: Path, result: SyncResult) -> IngestState:
    file = path.name
    state = store.get_ingest_state(run_id, file) or IngestState(file=file)
    file_id, head = _file_identity(path)
    size = path.stat().st_size
    replaced = state.file_id is not None and (
        file_id != state.file_id or size < state.byte_offset or not head.startswith(state.head or "")
    )
    if replaced:
        state.byte_offset, state.line_no, state.last_step, state.errors = 0, 0, None, None
    state.file_id, state.head = file_id, head
    if size == state.byte_offset:
        return state
    with path.open("rb") as fh:
        fh.seek(state.byte_offset)
        data = fh.read(min(size - state.byte_offset, _MAX_BYTES_PER_SYNC))
    complete_end = data.rfind(b"\n") + 1  # 0 when there is no full line yet
    if data[complete_end:].strip() and len(data) == size - state.byte_offset:
        result.partial_line = True
        line = state.line_no + data[:complete_end].count(b"\n") + 1
        msg = f"the last line of {file} is incomplete (still being written?); it is shown once complete"
        result.problems.append(_problem("partial_line", msg, file, line, level="warning"))
    lines = data[:complete_end].split(b"\n")[:-1] if complete_end else []
    offset = state.byte_offset
    errors = list(state.errors or [])
    for start in range(0, len(lines), _BATCH_LINES):
        chunk = lines[start : start + _BATCH_LINES]
        batch = _Batch()
        for raw in chunk:
            state.line_no += 1
            offset += len(raw) + 1
            if not raw.strip():
                continue
            record, problem = _parse_line(raw, state.line_no, file)
            if problem is not None:
                errors = [*errors, problem][-_MAX_KEPT_ERRORS:]
                continue
            assert record is not None
            batch.add(file, record)
            step = int(record["step"])
            state.last_step = step if state.last_step is None else max(state.last_step, step)
        state.byte_offset = offset
        state.errors = errors or None
        result.new_rows += store.write_batch(
            run_id,
            metrics=batch.metrics,
            evals=batch.evals,
            routing=batch.routing,
            layer_stats=batch.layer_stats,
            ingest=state,
        )
        result.new_lines += len(chunk)
    if replaced and state.byte_offset >= size:
        # the file was rewritten (a new run under the same name, or a resume that cut steps): rows of
        # steps the new file does not have are stale
        tables = (
            ("metrics", "eval_metrics", "routing_stats")
            if file == METRICS_FILE
            else ("routing_stats", "layer_stats")
        )
        store.delete_steps_after(run_id, state.last_step, tables)
    return state


def sync_runs_dir(store: RunStore, runs_dir: str | os.PathLike[str]) -> list[SyncResult]:
    """Sync every run directory (a folder with ``metrics.jsonl`` or ``config.yaml``) under ``runs_dir``."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory not found: {root}")
    results = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (
            (child / METRICS_FILE).is_file()
            or (child / "config.yaml").is_file()
            or (child / "summary.json").is_file()
        ):
            results.append(sync_run_dir(store, child))
    return results
