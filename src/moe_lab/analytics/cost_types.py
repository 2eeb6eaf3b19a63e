"""Result types of the cost model (:mod:`moe_lab.analytics.cost`): plain dataclasses with ``to_dict``.

Example:
    >>> from moe_lab.analytics.cost_types import MemoryEstimate
    >>> MemoryEstimate(weights=2.0, gradients=2.0, optimizer=8.0, activations=1.0, kv_cache=0.0).total
    13.0
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "CostSummary",
    "DenseComparison",
    "FlopBreakdown",
    "MemoryEstimate",
    "ParamCounts",
    "ThroughputEstimate",
]


@dataclass
class ParamCounts:
    """Parameter counts; ``active`` = used per token (routed experts count ``k / E``)."""

    total: int
    active: int
    embedding: int
    attention: int
    routed_experts: int
    shared_experts: int
    dense_ffn: int
    router: int
    other: int


@dataclass
class FlopBreakdown:
    """Forward FLOPs of one batch, by part; ``total`` is their sum."""

    attention_proj: int
    attention_core: int
    router: int
    experts: int
    shared_experts: int
    dense_ffn: int
    lm_head: int
    tokens: int

    @property
    def total(self) -> int:
        return (
            self.attention_proj
            + self.attention_core
            + self.router
            + self.experts
            + self.shared_experts
            + self.dense_ffn
            + self.lm_head
        )

    @property
    def per_token(self) -> float:
        return self.total / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "per_token": self.per_token}


@dataclass
class MemoryEstimate:
    """Bytes: weights, gradients, optimizer state (incl. fp32 master copy), activations, KV cache."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    kv_cache: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.kv_cache

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


@dataclass
class ThroughputEstimate:
    """Roofline estimate: time = max(FLOPs / (peak x mfu), bytes / bandwidth)."""

    hardware: str
    mode: str
    tokens_per_s: float
    flops: float
    bytes: float
    arithmetic_intensity: float
    bound: str
    fits_in_memory: bool


@dataclass
class DenseComparison:
    """A dense model with the same active (or total) parameters as the MoE model, side by side."""

    match: str
    dense_ffn_hidden_size: int
    moe_params: ParamCounts
    dense_params: ParamCounts
    moe_flops_per_token: float
    dense_flops_per_token: float


@dataclass
class CostSummary:
    """Everything :meth:`MoECostAnalyzer.summary` computes (``to_dict`` for reports and JSON)."""

    params: ParamCounts
    forward: FlopBreakdown
    training_flops_per_token: float
    memory: MemoryEstimate
    throughput: list[ThroughputEstimate]
    dense_same_active: DenseComparison
    dense_same_total: DenseComparison

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": asdict(self.params),
            "forward": self.forward.to_dict(),
            "training_flops_per_token": self.training_flops_per_token,
            "memory": self.memory.to_dict(),
            "throughput": [asdict(t) for t in self.throughput],
            "dense_same_active": asdict(self.dense_same_active),
            "dense_same_total": asdict(self.dense_same_total),
        }
