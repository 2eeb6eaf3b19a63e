"""Load-balancing and z-loss against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lab.nn.losses import expert_choice_fractions, load_balancing_loss, router_z_loss
from moe_lab.nn.router import ExpertChoiceRouter, RoutingDecision, SwitchRouter, TopKRouter


def _decision(idx, logits, slot_mask=None, dropped=None, token_mask=None) -> RoutingDecision:
    idx = torch.tensor(idx)
    logits = torch.as_tensor(logits, dtype=torch.float32)
    probs = torch.softmax(logits, -1)
    slot_mask = torch.ones_like(idx, dtype=torch.bool) if slot_mask is None else torch.tensor(slot_mask)
    dropped = torch.zeros_like(slot_mask) if dropped is None else torch.tensor(dropped)
    return RoutingDecision(
        expert_indices=idx,
        combine_weights=torch.where(slot_mask, probs.gather(1, idx), 0.0),
        slot_mask=slot_mask,
        dropped=dropped,
        router_logits=logits,
        router_probs=probs,
        tokens_per_expert=torch.bincount(idx[slot_mask], minlength=logits.shape[1]),
        token_mask=None if token_mask is None else torch.tensor(token_mask),
    )


def test_perfect_balance_is_exactly_one() -> None:
    # 4 tokens, 4 experts, top-2: every expert chosen twice, uniform probabilities
    d = _decision([[0, 1], [2, 3], [1, 0], [3, 2]], torch.zeros(4, 4))
    assert load_balancing_loss(d).item() == 1.0


def test_matches_hand_computation_and_counts_dropped_choices() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 3.0], [0.5, 0.0, 0.0]])
    idx = [[0], [0], [2], [0]]
    dropped = [[False], [False], [False], [True]]
    slot_mask = [[True], [True], [True], [False]]
    d = _decision(idx, logits, slot_mask=slot_mask, dropped=dropped)
    probs = torch.softmax(logits, -1)
    f = torch.tensor([3 / 4, 0.0, 1 / 4])  # dropped choice still counts as demand for expert 0
    p = probs.mean(0)
    expected = 3 * (f * p).sum()
    assert load_balancing_loss(d).item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(expert_choice_fractions(d), f)


def test_token_mask_excludes_padding() -> None:
    logits = torch.randn(5, 4)
    idx = [[0, 1], [1, 2], [3, 0], [2, 2], [0, 3]]
    mask = [True, True, False, True, False]
    d = _decision(idx, logits, token_mask=mask)
    keep = torch.tensor(mask)
    d_valid = _decision([idx[i] for i in range(5) if mask[i]], logits[keep])
    assert load_balancing_loss(d).item() == pytest.approx(load_balancing_loss(d_valid).item(), rel=1e-6)
    assert router_z_loss(d).item() == pytest.approx(router_z_loss(d_valid).item(), rel=1e-6)


def test_losses_are_differentiable_wrt_gate() -> None:
    torch.manual_seed(0)
    router = TopKRouter(8, 4, top_k=2)
    d = router(torch.randn(16, 8))
    (load_balancing_loss(d) + router_z_loss(d)).backward()
    assert router.gate.weight.grad.abs().sum() > 0


def test_z_loss_formula() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    d = _decision([[2], [0]], logits)
    expected = (math.log(math.exp(1) + math.exp(2) + math.exp(3)) ** 2 + math.log(3.0) ** 2) / 2
    assert router_z_loss(d).item() == pytest.approx(expected, rel=1e-6)


def test_expert_choice_loss_is_constant_one() -> None:
    torch.manual_seed(0)
    router = ExpertChoiceRouter(8, 4, top_k=2)
    d = router(torch.randn(12, 8))
    loss = load_balancing_loss(d)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    loss.backward()
    assert router.gate.weight.grad.abs().max() < 1e-6


def test_skewed_routing_costs_more_than_balance() -> None:
    torch.manual_seed(0)
    router = SwitchRouter(8, 4, capacity_factor=1.0)
    with torch.no_grad():
        router.gate.weight[0] = 5.0
    d = router(torch.rand(32, 8))
    assert load_balancing_loss(d).item() > 2.0


def test_all_padding_gives_zero() -> None:
    d = _decision([[0], [1]], torch.randn(2, 3), token_mask=[False, False])
    assert load_balancing_loss(d).item() == 0.0 and router_z_loss(d).item() == 0.0
