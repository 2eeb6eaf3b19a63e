"""The ``parallel`` section of a run config.

Example:
    >>> ParallelConfig(data_parallel="fsdp", expert_parallel=2).expert_parallel
    2
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from moe_lab.config import Config

__all__ = ["ParallelConfig"]


class ParallelConfig(Config):
    """How a run uses several processes (``torchrun``). Ignored when the world size is 1."""

    data_parallel: Literal["ddp", "fsdp"] = "ddp"
    """How the non-expert parameters are kept in sync: DDP (replicated, gradients all-reduced) or FSDP2
    (``fully_shard``: parameters, gradients and optimizer state sharded over the ranks)."""

    expert_parallel: int = 1
    """Size of the expert-parallel dimension: experts are split over this many ranks (tokens exchanged with
    all-to-all). The world size must be divisible by it, and so must ``model.num_experts``."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; ``auto`` = NCCL when CUDA is available, else gloo."""

    timeout_s: float = 120.0
    """Collective timeout: a rank that died makes the others fail within about this time, not hang."""

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        if self.expert_parallel < 1:
            raise ValueError(f"parallel.expert_parallel must be >= 1, got {self.expert_parallel}")
        if self.timeout_s <= 0:
            raise ValueError(f"parallel.timeout_s must be > 0, got {self.timeout_s}")
        return self
