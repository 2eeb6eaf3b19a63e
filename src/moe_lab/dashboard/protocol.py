"""JSON shapes of the dashboard API (pydantic models; also documented at ``/docs``).

Example:
    >>> from moe_lab.dashboard.protocol import ErrorResponse
    >>> ErrorResponse.make("not_found", "no run 7").model_dump()["error"]["code"]
    'not_found'
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = ["ErrorBody", "ErrorResponse", "Problem", "RunDetail", "RunList", "RunSummary"]


class Problem(BaseModel):
    """Something wrong with a run directory (shown by the page as a banner)."""

    kind: str = Field(description="missing, partial_line, bad_json, bad_record, bad_config, bad_summary, ...")
    level: str = Field(description="'error' or 'warning'")
    file: str | None = None
    line: int | None = None
    message: str


class RunSummary(BaseModel):
    id: int
    name: str
    status: str
    created_at: float
    updated_at: float
    last_step: int | None
    total_steps: int | None
    latest: dict[str, float | None]
    problems: list[Problem]


class RunList(BaseModel):
    runs: list[RunSummary]
    problems: list[Problem] = Field(
        description="problems not tied to one run (e.g. a missing runs directory)"
    )


class RunDetail(RunSummary):
    run_dir: str | None
    config: dict[str, Any] | None
    summary: dict[str, Any] | None
    metric_keys: list[str]
    num_layers: int
    num_experts: int


class ErrorBody(BaseModel):
    code: str
    message: str
    problems: list[Problem] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    """Every error answer: ``{"error": {"code": ..., "message": ..., "problems": [...]}}``."""

    error: ErrorBody

    @classmethod
    def make(cls, code: str, message: str, problems: list[dict[str, Any]] | None = None) -> ErrorResponse:
        return cls(
            error=ErrorBody(code=code, message=message, problems=[Problem(**p) for p in problems or []])
        )
