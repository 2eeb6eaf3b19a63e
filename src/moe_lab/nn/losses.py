"""Router losses: pure, differentiable functions of a :class:`RoutingDecision`.

Shape legend: T tokens, K slots per token, E experts. The caller multiplies by the coefficient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lab.nn.router import RoutingDecision

__all__ = ["expert_choice_fractions", "load_balancing_loss", "router_z_loss"]


def _valid(decision: RoutingDecision) -> Tensor:
    if decision.token_mask is None:
        return torch.ones(decision.num_tokens, dtype=torch.bool, device=decision.router_logits.device)
    return decision.token_mask.to(torch.bool)


def expert_choice_fractions(decision: RoutingDecision, num_experts: int | None = None) -> Tensor:
    """``f_e``: the fraction of router choices (kept + dropped slots, padding excluded) that went to e.

    Example:
        >>> from moe_lab.nn.router import TopKRouter
        >>> f = expert_choice_fractions(TopKRouter(8, 4)(torch.randn(6, 8)))
        >>> round(float(f.sum()), 4)
        1.0
    """
    e = num_experts if num_experts is not None else decision.num_experts
    chosen_TK = (decision.slot_mask | decision.dropped) & _valid(decision)[:, None]
    counts_E = torch.bincount(decision.expert_indices[chosen_TK], minlength=e).float()
    return counts_E / counts_E.sum().clamp_min(1.0)


def load_balancing_loss(decision: RoutingDecision, num_experts: int | None = None) -> Tensor:
    """Switch/GShard auxiliary loss ``E * sum_e f_e * P_e`` (exactly 1.0 at perfect balance).

    ``f_e`` is the fraction of router choices to expert e *before* capacity dropping (so the loss still
    sees the demand that was dropped); it equals "tokens routed to e / T" divided by K. ``P_e`` is the mean
    router probability of e over non-padding tokens (sigmoid scores are normalised per token to sum to 1
    first). Only ``P`` carries a gradient. For expert choice every expert takes exactly c tokens, so
    ``f_e = 1/E`` and the loss is the constant 1.0 with zero gradient: expert choice is balanced by
    construction and needs no auxiliary loss.

    Example:
        >>> from moe_lab.nn.router import TopKRouter
        >>> loss = load_balancing_loss(TopKRouter(8, 4)(torch.randn(32, 8)))
        >>> loss.shape
        torch.Size([])
    """
    e = num_experts if num_experts is not None else decision.num_experts
    valid_T = _valid(decision)
    probs_TE = decision.router_probs.float()
    probs_TE = probs_TE / probs_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    n_valid = valid_T.sum()
    if int(n_valid) == 0:
        return probs_TE.sum() * 0.0
    p_E = (probs_TE * valid_T[:, None]).sum(0) / n_valid
    f_E = expert_choice_fractions(decision, e).to(p_E.device)
    return e * torch.sum(f_E * p_E)


def router_z_loss(decision: RoutingDecision) -> Tensor:
    """ST-MoE router z-loss: mean over non-padding tokens of ``logsumexp(logits)^2``.

    Example:
        >>> from moe_lab.nn.router import TopKRouter
        >>> bool(router_z_loss(TopKRouter(8, 4)(torch.randn(3, 8))) >= 0)
        True
    """
    valid_T = _valid(decision)
    z_T = torch.logsumexp(decision.router_logits.float(), dim=-1)
    n_valid = valid_T.sum()
    if int(n_valid) == 0:
        return z_T.sum() * 0.0
    return (z_T.square() * valid_T).sum() / n_valid
