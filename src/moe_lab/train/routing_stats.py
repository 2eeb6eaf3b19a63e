"""Per-step routing statistics for the metrics log: expert load fractions and drop rate.

Example:
    >>> import torch
    >>> from moe_lab.nn.router import RoutingDecision
    >>> idx = torch.tensor([[0], [1], [1], [1]])
    >>> d = RoutingDecision(idx, torch.ones(4, 1), torch.ones(4, 1, dtype=torch.bool),
    ...     torch.zeros(4, 1, dtype=torch.bool), torch.zeros(4, 2), torch.full((4, 2), 0.5), torch.tensor([1, 3]))
    >>> expert_load([d])
    [[0.25, 0.75]]
"""

from __future__ import annotations

import torch

from moe_lab.nn.router import RoutingDecision

__all__ = ["drop_rate", "expert_load", "merge_decisions"]


def merge_decisions(per_micro: list[list[RoutingDecision]]) -> list[RoutingDecision]:
    """Concatenate the detached decisions of several micro-batches, layer by layer (token axis first;
    ``tokens_per_expert`` summed). A single micro-batch is returned as is."""
    if len(per_micro) == 1:
        return per_micro[0]
    merged = []
    for layer in zip(*per_micro):
        masks = [d.token_mask for d in layer]
        token_mask = None
        if any(m is not None for m in masks):
            token_mask = torch.cat(
                [
                    m
                    if m is not None
                    else torch.ones(d.num_tokens, dtype=torch.bool, device=d.router_logits.device)
                    for m, d in zip(masks, layer)
                ]
            )
        caps = {d.capacity for d in layer}
        merged.append(
            RoutingDecision(
                expert_indices=torch.cat([d.expert_indices for d in layer]),
                combine_weights=torch.cat([d.combine_weights for d in layer]),
                slot_mask=torch.cat([d.slot_mask for d in layer]),
                dropped=torch.cat([d.dropped for d in layer]),
                router_logits=torch.cat([d.router_logits for d in layer]),
                router_probs=torch.cat([d.router_probs for d in layer]),
                tokens_per_expert=torch.stack([d.tokens_per_expert for d in layer]).sum(0),
                capacity=caps.pop() if len(caps) == 1 else None,
                token_mask=token_mask,
            )
        )
    return merged


def expert_load(routing: list[RoutingDecision]) -> list[list[float]]:
    """Per MoE layer, the fraction of kept slots each expert received (sums to 1 per layer)."""
    out = []
    for d in routing:
        counts = d.tokens_per_expert.detach().float().cpu()
        total = float(counts.sum())
        out.append([round(float(c) / total, 6) if total > 0 else 0.0 for c in counts])
    return out


def drop_rate(routing: list[RoutingDecision]) -> float:
    """Mean over MoE layers of the fraction of chosen slots dropped by capacity."""
    if not routing:
        return 0.0
    return sum(d.drop_rate() for d in routing) / len(routing)
