"""Routers: score tokens against experts and return one :class:`RoutingDecision`.

Shape legend: T tokens (batch x sequence, flattened), K slots per token, E experts, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RoutingDecision"]


@dataclass
class RoutingDecision:
    """What a router decided for one MoE layer and one batch of T tokens.

    Every router returns this; dispatch, losses and analytics are pure functions of it.

    Attributes:
        expert_indices: ``[T, K]`` int64, the expert of each slot. Token-choice routers use K = top-k;
            the expert-choice router uses K = E with ``expert_indices[t, e] == e``.
        combine_weights: ``[T, K]`` float, the weight of each slot's expert output in the token's output;
            exactly 0 where ``slot_mask`` is False.
        slot_mask: ``[T, K]`` bool, True where the slot is kept and computed.
        dropped: ``[T, K]`` bool, True where the router chose the slot but capacity dropped it
            (always False for dropless routing and for expert choice).
        router_logits: ``[T, E]`` float32, raw scores before softmax/sigmoid (the z-loss input).
        router_probs: ``[T, E]`` float32, softmax (or sigmoid) scores (the load-balancing loss input).
        tokens_per_expert: ``[E]`` int64, kept slots per expert.
        capacity: slots per expert when a capacity applies, else None.
        token_mask: ``[T]`` bool, False for padding tokens (excluded from statistics and losses), or None.
    """

    expert_indices: Tensor
    combine_weights: Tensor
    slot_mask: Tensor
    dropped: Tensor
    router_logits: Tensor
    router_probs: Tensor
    tokens_per_expert: Tensor
    capacity: int | None = None
    token_mask: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return int(self.router_logits.shape[-1])

    @property
    def num_tokens(self) -> int:
        return int(self.router_logits.shape[0])

    def detach(self) -> RoutingDecision:
        """A copy with every tensor detached (for statistics kept beyond the step)."""
        return RoutingDecision(
            expert_indices=self.expert_indices.detach(),
            combine_weights=self.combine_weights.detach(),
            slot_mask=self.slot_mask.detach(),
            dropped=self.dropped.detach(),
            router_logits=self.router_logits.detach(),
            router_probs=self.router_probs.detach(),
            tokens_per_expert=self.tokens_per_expert.detach(),
            capacity=self.capacity,
            token_mask=None if self.token_mask is None else self.token_mask.detach(),
        )

    def drop_rate(self) -> float:
        """Fraction of chosen slots that capacity dropped (0.0 when nothing was dropped)."""
        chosen = self.slot_mask.sum() + self.dropped.sum()
        return float(self.dropped.sum()) / float(chosen) if int(chosen) > 0 else 0.0


def _check(decision: RoutingDecision) -> None:
    """Cheap internal consistency checks used by tests."""
    t, k = decision.expert_indices.shape
    assert decision.combine_weights.shape == (t, k)
    assert decision.slot_mask.shape == (t, k) and decision.slot_mask.dtype == torch.bool
    assert decision.dropped.shape == (t, k) and decision.dropped.dtype == torch.bool
    assert decision.router_logits.shape[0] == t
