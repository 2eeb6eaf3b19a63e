"""Helpers for analytics tests: hand-built RoutingDecisions with known statistics."""

from __future__ import annotations

import torch

from moe_lab.nn.router import RoutingDecision


def make_decision(
    indices: list[list[int]] | torch.Tensor,
    num_experts: int,
    *,
    probs: torch.Tensor | None = None,
    dropped: list[list[bool]] | torch.Tensor | None = None,
    token_mask: list[bool] | None = None,
    capacity: int | None = None,
) -> RoutingDecision:
    idx = torch.as_tensor(indices, dtype=torch.long)
    t, k = idx.shape
    drop = (
        torch.zeros(t, k, dtype=torch.bool) if dropped is None else torch.as_tensor(dropped, dtype=torch.bool)
    )
    mask = None if token_mask is None else torch.as_tensor(token_mask, dtype=torch.bool)
    kept = ~drop
    if mask is not None:
        kept &= mask[:, None]
        drop = drop & mask[:, None]
    if probs is None:
        probs = torch.full((t, num_experts), 1.0 / num_experts)
    tpe = torch.bincount(idx[kept], minlength=num_experts)
    return RoutingDecision(
        expert_indices=idx,
        combine_weights=kept.float() / k,
        slot_mask=kept,
        dropped=drop,
        router_logits=probs.log(),
        router_probs=probs,
        tokens_per_expert=tpe,
        capacity=capacity,
        token_mask=mask,
    )


def random_decision(
    t: int, e: int, k: int, *, seed: int, pad: bool = True, drop: bool = True
) -> RoutingDecision:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g) * 2
    probs = logits.softmax(-1)
    idx = probs.topk(k, -1).indices
    dropped = (torch.rand(t, k, generator=g) < 0.2) if drop else None
    mask = (torch.rand(t, generator=g) > 0.25).tolist() if pad else None
    return make_decision(idx, e, probs=probs, dropped=dropped, token_mask=mask, capacity=max(1, t * k // e))
