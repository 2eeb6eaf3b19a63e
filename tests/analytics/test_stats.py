"""Routing statistics on hand-built decisions with known answers, and against slow references."""

from __future__ import annotations

import math

import pytest
import torch
from _analytics_helpers import make_decision, random_decision

from moe_lab.analytics.stats import (
    RoutingCounts,
    capacity_utilization,
    co_selection_matrix,
    coefficient_of_variation,
    drop_rate,
    expert_counts,
    layer_stats,
    load_fractions,
    router_entropy,
    router_stats,
)


def test_perfect_balance():
    d = make_decision([[0, 1], [2, 3], [1, 0], [3, 2]], 4)  # uniform router probs
    s = layer_stats(d)
    assert s.expert_counts == [2, 2, 2, 2]
    assert s.load_fractions == [0.25] * 4
    assert s.cv == 0.0 and s.load_variance == 0.0 and s.max_mean_ratio == 1.0
    assert s.entropy == pytest.approx(math.log(4))
    assert s.entropy_normalized == pytest.approx(1.0)
    assert s.load_entropy_normalized == pytest.approx(1.0)
    assert s.drop_rate == 0.0 and s.num_tokens == 4


def test_all_to_one_expert():
    e = 4
    probs = torch.zeros(5, e)
    probs[:, 2] = 1.0
    d = make_decision([[2]] * 5, e, probs=probs)
    s = layer_stats(d)
    assert s.expert_counts == [0, 0, 5, 0]
    assert s.load_fractions == [0.0, 0.0, 1.0, 0.0]
    assert s.cv == pytest.approx(math.sqrt(e - 1))
    assert s.max_mean_ratio == pytest.approx(e)
    assert s.load_variance == pytest.approx(torch.tensor([0.0, 0, 1, 0]).var(unbiased=False).item())
    assert s.entropy == pytest.approx(0.0, abs=1e-9) and s.entropy_normalized == pytest.approx(0.0, abs=1e-9)
    assert s.load_entropy_normalized == pytest.approx(0.0, abs=1e-9)


def test_drop_rate_and_capacity():
    d = make_decision(
        [[0, 1], [0, 1], [0, 2], [0, 3]],
        4,
        dropped=[[False, False], [False, False], [True, False], [True, False]],
        capacity=2,
    )
    assert drop_rate(d) == pytest.approx(2 / 8)
    assert expert_counts(d).tolist() == [2, 2, 1, 1]
    assert expert_counts(d, kept_only=False).tolist() == [4, 2, 1, 1]
    assert capacity_utilization(d) == pytest.approx(6 / (2 * 4))
    s = layer_stats(d)
    assert s.drop_rate == pytest.approx(0.25) and s.dropped_counts == [2, 0, 0, 0]
    assert s.capacity_utilization == pytest.approx(0.75)
    assert layer_stats(make_decision([[0]], 2)).capacity_utilization is None


def test_co_selection_counts():
    d = make_decision([[0, 1], [0, 1], [1, 2], [3, 0]], 4, dropped=[[False, False]] * 3 + [[False, True]])
    co = co_selection_matrix(d)
    expected = torch.tensor([[3, 2, 0, 1], [2, 3, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]])
    assert torch.equal(co, expected)  # dropped slots were still chosen together
    assert torch.equal(co, co.T)


def test_padding_excluded():
    # the two padding tokens would all go to expert 3 and be dropped: they must not count anywhere
    probs = torch.tensor([[0.25] * 4, [0.25] * 4, [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    d = make_decision(
        [[0], [1], [3], [3]],
        4,
        probs=probs,
        dropped=[[False], [False], [True], [True]],
        token_mask=[True, True, False, False],
    )
    s = layer_stats(d)
    assert s.num_tokens == 2
    assert s.expert_counts == [1, 1, 0, 0] and s.dropped_counts == [0, 0, 0, 0]
    assert s.drop_rate == 0.0
    assert s.entropy_normalized == pytest.approx(1.0)
    assert co_selection_matrix(d)[3, 3] == 0


def test_sigmoid_probs_are_renormalised():
    probs = torch.full((3, 4), 0.9)  # sigmoid scores need not sum to 1
    assert router_entropy(make_decision([[0], [1], [2]], 4, probs=probs), normalized=True) == pytest.approx(
        1.0
    )


def _reference(d):
    """Obvious per-token loops."""
    e = d.num_experts
    t, k = d.expert_indices.shape
    valid = [True] * t if d.token_mask is None else d.token_mask.tolist()
    kept, chosen, dropped = [0] * e, 0, 0
    co = [[0] * e for _ in range(e)]
    ent = []
    for i in range(t):
        if not valid[i]:
            continue
        sel = set()
        for j in range(k):
            ex = int(d.expert_indices[i, j])
            if d.slot_mask[i, j]:
                kept[ex] += 1
            if d.slot_mask[i, j] or d.dropped[i, j]:
                chosen += 1
                sel.add(ex)
            if d.dropped[i, j]:
                dropped += 1
        for a in sel:
            for b in sel:
                co[a][b] += 1
        p = d.router_probs[i].double()
        p = p / p.sum()
        ent.append(-sum(float(x) * math.log(float(x)) for x in p if x > 0))
    mean = sum(kept) / e
    std = math.sqrt(sum((c - mean) ** 2 for c in kept) / e)
    return {
        "kept": kept,
        "cv": std / mean,
        "drop": dropped / chosen,
        "co": co,
        "entropy": sum(ent) / len(ent),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_random_decisions(seed):
    d = random_decision(64, 6, 2, seed=seed)
    ref = _reference(d)
    s = layer_stats(d)
    assert s.expert_counts == ref["kept"]
    assert s.cv == pytest.approx(ref["cv"])
    assert coefficient_of_variation(expert_counts(d)) == pytest.approx(ref["cv"])
    assert s.drop_rate == pytest.approx(ref["drop"])
    assert s.co_selection == ref["co"]
    assert s.entropy == pytest.approx(ref["entropy"])
    assert sum(load_fractions(expert_counts(d)).tolist()) == pytest.approx(1.0)


def test_accumulation_equals_one_big_batch():
    parts = [random_decision(32, 4, 2, seed=s) for s in range(3)]
    acc = RoutingCounts(num_experts=4)
    for p in parts:
        acc.add(p)
    merged = make_decision(
        torch.cat([p.expert_indices for p in parts]),
        4,
        probs=torch.cat([p.router_probs for p in parts]),
        dropped=torch.cat([p.dropped for p in parts]),
        token_mask=torch.cat([p.token_mask for p in parts]).tolist(),
    )
    a, b = acc.to_layer_stats(), layer_stats(merged)
    assert a.expert_counts == b.expert_counts and a.co_selection == b.co_selection
    assert a.entropy == pytest.approx(b.entropy) and a.drop_rate == pytest.approx(b.drop_rate)
    split = RoutingCounts(num_experts=4).add(parts[0]).merge(RoutingCounts(num_experts=4).add(parts[1]))
    assert split.num_tokens == int(parts[0].token_mask.sum() + parts[1].token_mask.sum())
    with pytest.raises(ValueError, match="experts"):
        acc.add(random_decision(8, 5, 1, seed=0))


def test_router_stats_roundtrip():
    rs = router_stats([random_decision(16, 4, 2, seed=0), random_decision(16, 4, 2, seed=1)], step=7)
    assert [s.layer for s in rs.layers] == [0, 1] and rs.step == 7
    again = type(rs).from_dict(rs.to_dict())
    assert again == rs
    assert rs.mean_cv == pytest.approx((rs.layers[0].cv + rs.layers[1].cv) / 2)


@pytest.mark.parametrize("k", [1, 2, 6])
def test_co_selection_both_paths_match_reference(k):
    d = random_decision(40, 8, k, seed=k)
    assert co_selection_matrix(d).tolist() == _reference(d)["co"]
