"""Routing statistics: pure functions of :class:`~moe_lab.nn.router.RoutingDecision` (no state, no I/O).

Shape legend: T tokens, K slots per token, E experts.

Definitions (padding tokens, ``token_mask == False``, are excluded everywhere):

* *chosen* slot: one the router picked, kept or dropped (``slot_mask | dropped``);
  *kept* slot: one that was computed (``slot_mask``).
* expert counts: kept slots per expert; load fractions: counts / total kept slots (sum to 1).
* load variance: population variance of the load fractions; cv: population std / mean of the counts
  (0 for perfect balance, ``sqrt(E - 1)`` when one expert takes everything); max/mean: max count / mean count.
* drop rate: dropped slots / chosen slots.
* router entropy: mean over tokens of ``-sum_e p_e log p_e`` of the router probabilities (renormalised per
  token, so sigmoid routers work too); normalised by ``log E`` it is 1 for uniform probabilities, 0 for one-hot.
* load entropy: entropy of the load fractions, normalised by ``log E`` (1 = perfectly balanced).
* co-selection ``[E, E]``: entry ``(i, j)`` counts tokens that chose both i and j (diagonal: tokens that chose i).
* capacity utilisation: kept slots / (capacity x E), only when a capacity applies.

Example:
    >>> import torch
    >>> from moe_lab.analytics.stats import layer_stats
    >>> from moe_lab.nn.router import RoutingDecision
    >>> idx = torch.tensor([[0], [1], [2], [3]])
    >>> d = RoutingDecision(idx, torch.ones(4, 1), torch.ones(4, 1, dtype=torch.bool),
    ...     torch.zeros(4, 1, dtype=torch.bool), torch.zeros(4, 4), torch.full((4, 4), 0.25),
    ...     torch.ones(4, dtype=torch.long))
    >>> s = layer_stats(d)
    >>> (s.cv, round(s.entropy_normalized, 6), s.load_fractions)
    (0.0, 1.0, [0.25, 0.25, 0.25, 0.25])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from moe_lab.nn.router import RoutingDecision

__all__ = [
    "LayerStats",
    "RouterStats",
    "RoutingCounts",
    "capacity_utilization",
    "chosen_mask",
    "co_selection_matrix",
    "coefficient_of_variation",
    "drop_rate",
    "expert_counts",
    "layer_stats",
    "load_entropy",
    "load_fractions",
    "load_variance",
    "max_mean_ratio",
    "router_entropy",
    "router_stats",
]


def _valid_TK(decision: RoutingDecision) -> Tensor | None:
    """``[T, 1]`` bool of non-padding tokens, or None when there is no token mask."""
    if decision.token_mask is None:
        return None
    return decision.token_mask.reshape(-1, 1).to(torch.bool)


def chosen_mask(decision: RoutingDecision, *, kept_only: bool = False) -> Tensor:
    """``[T, K]`` bool: slots the router chose (kept or dropped), or only the kept ones; padding excluded."""
    mask_TK = decision.slot_mask if kept_only else (decision.slot_mask | decision.dropped)
    valid = _valid_TK(decision)
    return mask_TK if valid is None else mask_TK & valid


def expert_counts(decision: RoutingDecision, *, kept_only: bool = True) -> Tensor:
    """``[E]`` int64 slots per expert: kept ones by default, chosen ones (kept + dropped) otherwise."""
    mask_TK = chosen_mask(decision, kept_only=kept_only)
    return _masked_bincount(decision.expert_indices, mask_TK, decision.num_experts)


def _masked_bincount(idx_TK: Tensor, mask_TK: Tensor, e: int) -> Tensor:
    """``[E]`` int64 count of ``idx`` where ``mask``; weighted bincount (no boolean indexing, no sync)."""
    weights = mask_TK.reshape(-1).to(torch.float64)
    return torch.bincount(idx_TK.reshape(-1).clamp(0, e - 1), weights=weights, minlength=e).round().long()


def load_fractions(counts: Tensor) -> Tensor:
    """``[E]`` float64 share of each expert (sums to 1; all zeros when there is no token)."""
    counts = counts.to(torch.float64)
    total = counts.sum()
    return counts / total if float(total) > 0 else torch.zeros_like(counts)


def load_variance(fractions: Tensor) -> float:
    """Population variance of the load fractions (0 for perfect balance)."""
    return float(fractions.to(torch.float64).var(unbiased=False))


def coefficient_of_variation(counts: Tensor) -> float:
    """Population std / mean of per-expert counts (0 balanced, ``sqrt(E-1)`` all on one expert)."""
    c = counts.to(torch.float64)
    mean = float(c.mean())
    return float(c.std(unbiased=False)) / mean if mean > 0 else 0.0


def max_mean_ratio(counts: Tensor) -> float:
    """Largest per-expert count over the mean count (1 for perfect balance, E for all-to-one)."""
    c = counts.to(torch.float64)
    mean = float(c.mean())
    return float(c.max()) / mean if mean > 0 else 0.0


def drop_rate(decision: RoutingDecision) -> float:
    """Dropped slots / chosen slots over non-padding tokens (0.0 when nothing was chosen)."""
    chosen = int(chosen_mask(decision).sum())
    valid = _valid_TK(decision)
    dropped_TK = decision.dropped if valid is None else decision.dropped & valid
    return int(dropped_TK.sum()) / chosen if chosen > 0 else 0.0


def _token_entropy_T(decision: RoutingDecision) -> tuple[Tensor, Tensor]:
    """``([T] float32 entropy in nats of each token's renormalised router probabilities, [T] float32
    weights: 1 for real tokens, 0 for padding)`` (no boolean indexing: it syncs and is slow on CPU)."""
    probs_TE = decision.router_probs.detach().float()
    probs_TE = probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(1e-30)
    h_T = torch.special.entr(probs_TE).sum(-1)
    if decision.token_mask is None:
        return h_T, torch.ones_like(h_T)
    w_T = decision.token_mask.reshape(-1).to(h_T.dtype)
    return h_T * w_T, w_T


def router_entropy(decision: RoutingDecision, *, normalized: bool = False) -> float:
    """Mean per-token entropy of the router probabilities; divided by ``log E`` when ``normalized``."""
    h_T, w_T = _token_entropy_T(decision)
    n = float(w_T.sum())
    mean = float(h_T.double().sum()) / n if n > 0 else 0.0
    if normalized:
        e = decision.num_experts
        return mean / math.log(e) if e > 1 else 0.0
    return mean


def load_entropy(fractions: Tensor, *, normalized: bool = True) -> float:
    """Entropy of the load distribution; divided by ``log E`` when ``normalized`` (1 = balanced)."""
    f = fractions.to(torch.float64)
    h = float(-(f * f.clamp_min(1e-300).log()).sum())
    e = f.numel()
    if normalized:
        return h / math.log(e) if e > 1 else 0.0
    return h


def co_selection_matrix(decision: RoutingDecision) -> Tensor:
    """``[E, E]`` int64: tokens that chose both experts i and j (diagonal: tokens that chose i)."""
    e = decision.num_experts
    mask_TK = chosen_mask(decision)
    idx_TK = decision.expert_indices.clamp(0, e - 1)
    k = idx_TK.shape[1]
    if k <= 4:  # top-k routers (distinct experts per token): count slot pairs with one weighted bincount
        pair_N = (idx_TK[:, :, None] * e + idx_TK[:, None, :]).reshape(-1)
        w_N = (mask_TK[:, :, None] & mask_TK[:, None, :]).reshape(-1).to(torch.float64)
        return torch.bincount(pair_N, weights=w_N, minlength=e * e).round().long().view(e, e)
    # many slots (expert choice, top-8): token x expert selection matrix, float64 keeps counts exact
    sel_TE = torch.zeros(idx_TK.shape[0], e, dtype=torch.float64, device=idx_TK.device)
    sel_TE.scatter_add_(1, idx_TK, mask_TK.to(torch.float64)).clamp_(max=1.0)
    return (sel_TE.T.contiguous() @ sel_TE).round().to(torch.int64)


def capacity_utilization(decision: RoutingDecision) -> float | None:
    """Kept slots / (capacity x E), or None when the router has no capacity."""
    if decision.capacity is None or decision.capacity <= 0:
        return None
    kept = int(chosen_mask(decision, kept_only=True).sum())
    return kept / (decision.capacity * decision.num_experts)


@dataclass
class LayerStats:
    """Routing statistics of one MoE layer over the tokens seen (see the module docstring)."""

    layer: int
    name: str
    num_experts: int
    num_tokens: int
    expert_counts: list[int]
    load_fractions: list[float]
    load_variance: float
    cv: float
    max_mean_ratio: float
    drop_rate: float
    entropy: float
    entropy_normalized: float
    load_entropy_normalized: float
    capacity_utilization: float | None = None
    dropped_counts: list[int] = field(default_factory=list)
    co_selection: list[list[int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerStats:
        return cls(**data)


@dataclass
class RouterStats:
    """Statistics of every MoE layer (``layers[i]`` is the i-th MoE layer), optionally at a step."""

    layers: list[LayerStats]
    step: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.layers[0].num_tokens if self.layers else 0

    @property
    def mean_cv(self) -> float:
        return sum(s.cv for s in self.layers) / len(self.layers) if self.layers else 0.0

    @property
    def mean_entropy_normalized(self) -> float:
        return sum(s.entropy_normalized for s in self.layers) / len(self.layers) if self.layers else 0.0

    @property
    def drop_rate(self) -> float:
        return sum(s.drop_rate for s in self.layers) / len(self.layers) if self.layers else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "layers": [s.to_dict() for s in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouterStats:
        return cls(layers=[LayerStats.from_dict(x) for x in data["layers"]], step=data.get("step"))


@dataclass
class RoutingCounts:
    """Cheap accumulator for one layer: a few ``[E]`` / ``[E, E]`` int64 tensors and sums, no per-token data.

    Example:
        >>> acc = RoutingCounts(num_experts=4)  # doctest: +SKIP
        >>> acc.add(decision); acc.add(other_decision)  # doctest: +SKIP
        >>> acc.to_layer_stats(layer=0).cv  # doctest: +SKIP
    """

    num_experts: int
    num_tokens: int = 0
    kept: Tensor | None = None
    dropped: Tensor | None = None
    entropy_sum: float = 0.0
    capacity_slots: int = 0
    capacity_kept: int = 0
    co_selection: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kept is None:
            self.kept = torch.zeros(self.num_experts, dtype=torch.int64)
        if self.dropped is None:
            self.dropped = torch.zeros(self.num_experts, dtype=torch.int64)

    def add(self, decision: RoutingDecision, *, with_co_selection: bool = True) -> RoutingCounts:
        """Add one decision's counts (all on the decision's device, then one small copy to CPU)."""
        if decision.num_experts != self.num_experts:
            raise ValueError(
                f"RoutingDecision has {decision.num_experts} experts, this accumulator {self.num_experts}"
            )
        e = self.num_experts
        kept_E = expert_counts(decision, kept_only=True)
        valid = _valid_TK(decision)
        dropped_TK = decision.dropped if valid is None else decision.dropped & valid
        dropped_E = _masked_bincount(decision.expert_indices, dropped_TK, e)
        h_T, w_T = _token_entropy_T(decision)
        parts = [kept_E.to(torch.float64), dropped_E.to(torch.float64), h_T.double().sum().reshape(1)]
        parts.append(w_T.double().sum().reshape(1))
        if with_co_selection:
            parts.append(co_selection_matrix(decision).to(torch.float64).reshape(-1))
        flat = torch.cat([p.to(kept_E.device) for p in parts]).cpu()  # one device->host copy
        assert self.kept is not None and self.dropped is not None
        self.kept += flat[:e].round().to(torch.int64)
        self.dropped += flat[e : 2 * e].round().to(torch.int64)
        self.entropy_sum += float(flat[2 * e])
        self.num_tokens += int(flat[2 * e + 1])
        if with_co_selection:
            co = flat[2 * e + 2 :].round().to(torch.int64).reshape(e, e)
            self.co_selection = co if self.co_selection is None else self.co_selection + co
        if decision.capacity is not None and decision.capacity > 0:
            self.capacity_slots += decision.capacity * e
            self.capacity_kept += int(flat[:e].sum())
        return self

    def merge(self, other: RoutingCounts) -> RoutingCounts:
        """A new accumulator holding both (e.g. to combine data-parallel ranks or steps)."""
        if other.num_experts != self.num_experts:
            raise ValueError(f"cannot merge counts of {self.num_experts} and {other.num_experts} experts")
        assert self.kept is not None and self.dropped is not None
        assert other.kept is not None and other.dropped is not None
        co = self.co_selection
        if other.co_selection is not None:
            co = other.co_selection.clone() if co is None else co + other.co_selection
        return RoutingCounts(
            num_experts=self.num_experts,
            num_tokens=self.num_tokens + other.num_tokens,
            kept=self.kept + other.kept,
            dropped=self.dropped + other.dropped,
            entropy_sum=self.entropy_sum + other.entropy_sum,
            capacity_slots=self.capacity_slots + other.capacity_slots,
            capacity_kept=self.capacity_kept + other.capacity_kept,
            co_selection=co,
        )

    def to_layer_stats(self, layer: int = 0, name: str = "") -> LayerStats:
        assert self.kept is not None and self.dropped is not None
        frac = load_fractions(self.kept)
        chosen = int(self.kept.sum() + self.dropped.sum())
        entropy = self.entropy_sum / self.num_tokens if self.num_tokens else 0.0
        log_e = math.log(self.num_experts) if self.num_experts > 1 else 0.0
        return LayerStats(
            layer=layer,
            name=name or f"layer{layer}",
            num_experts=self.num_experts,
            num_tokens=self.num_tokens,
            expert_counts=[int(x) for x in self.kept.tolist()],
            load_fractions=[float(x) for x in frac.tolist()],
            load_variance=load_variance(frac),
            cv=coefficient_of_variation(self.kept),
            max_mean_ratio=max_mean_ratio(self.kept),
            drop_rate=int(self.dropped.sum()) / chosen if chosen else 0.0,
            entropy=entropy,
            entropy_normalized=entropy / log_e if log_e else 0.0,
            load_entropy_normalized=load_entropy(frac) if chosen else 0.0,
            capacity_utilization=self.capacity_kept / self.capacity_slots if self.capacity_slots else None,
            dropped_counts=[int(x) for x in self.dropped.tolist()],
            co_selection=None if self.co_selection is None else self.co_selection.tolist(),
        )


def layer_stats(
    decision: RoutingDecision, *, layer: int = 0, name: str = "", with_co_selection: bool = True
) -> LayerStats:
    """All statistics of one decision (see the module docstring for the definitions)."""
    counts = RoutingCounts(num_experts=decision.num_experts)
    return counts.add(decision, with_co_selection=with_co_selection).to_layer_stats(layer, name)


def router_stats(
    decisions: list[RoutingDecision],
    *,
    names: list[str] | None = None,
    step: int | None = None,
    with_co_selection: bool = True,
) -> RouterStats:
    """:class:`RouterStats` of one decision per MoE layer (e.g. ``MoEOutput.routing``)."""
    names = names or [f"layer{i}" for i in range(len(decisions))]
    return RouterStats(
        layers=[
            layer_stats(d, layer=i, name=n, with_co_selection=with_co_selection)
            for i, (d, n) in enumerate(zip(decisions, names))
        ],
        step=step,
    )
