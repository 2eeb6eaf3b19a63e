"""Plain records the run store returns, and its error type.

Example:
    >>> from moe_lab.tracking.records import RoutingHistory
    >>> RoutingHistory(steps=[1], load=[[[0.5, 0.5]]]).num_experts
    2
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["IngestState", "RoutingHistory", "RunRecord", "StoreError"]


class StoreError(RuntimeError):
    """A run-store problem the user can fix (bad URL, unknown run, unreachable database)."""


@dataclass
class RunRecord:
    """One row of ``runs`` plus the last logged step."""

    id: int
    name: str
    status: str
    created_at: float
    updated_at: float
    config: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    run_dir: str | None = None
    last_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RoutingHistory:
    """Expert loads over time: ``load[i][layer][expert]`` at ``steps[i]`` (fractions that sum to ~1)."""

    steps: list[int] = field(default_factory=list)
    load: list[list[list[float]]] = field(default_factory=list)
    count: list[list[list[int | None]]] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return max((len(s) for s in self.load), default=0)

    @property
    def num_experts(self) -> int:
        return max((len(layer) for s in self.load for layer in s), default=0)


@dataclass
class IngestState:
    """How far a run directory file was read: byte offset, lines consumed, last step, file identity."""

    file: str
    byte_offset: int = 0
    line_no: int = 0
    last_step: int | None = None
    file_id: str | None = None
    head: str | None = None
    errors: list[dict[str, Any]] | None = None
