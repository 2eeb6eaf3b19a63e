"""Router invariants: weights, capacity, dropping order, expert choice, bias balancing, padding, errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from _moe_reference import reference_keep

from moe_lab.nn.router import (
    ExpertChoiceRouter,
    RoutingDecision,
    SigmoidBiasRouter,
    SwitchRouter,
    TopKRouter,
    build_router,
    capacity_for,
)
from moe_lab.nn.routing import _check

D, E = 16, 8


def _skewed(router: torch.nn.Module, t: int = 64, seed: int = 0) -> torch.Tensor:
    """Inputs that most tokens send to expert 0 (and few to the others)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(D, generator=g)
    with torch.no_grad():
        router.gate.weight[0] += 2.0 * v / v.norm()
    return torch.randn(t, D, generator=g) + 2.0 * v / v.norm()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_norm_weights_sum_to_one(seed: int) -> None:
    torch.manual_seed(seed)
    router = TopKRouter(D, E, top_k=2, norm_topk_prob=True)
    d = router(torch.randn(20, D))
    _check(d)
    assert torch.allclose(d.combine_weights.sum(-1), torch.ones(20), atol=1e-6)
    assert torch.equal(d.expert_indices, torch.topk(d.router_probs, 2, dim=-1).indices)
    assert d.slot_mask.all() and not d.dropped.any() and d.capacity is None
    assert torch.equal(d.tokens_per_expert, torch.bincount(d.expert_indices.reshape(-1), minlength=E))
    assert d.router_logits.dtype == torch.float32
    assert torch.allclose(d.router_probs, torch.softmax(d.router_logits, -1))


def test_topk_without_norm_keeps_raw_probs() -> None:
    torch.manual_seed(0)
    router = TopKRouter(D, E, top_k=3, norm_topk_prob=False)
    d = router(torch.randn(12, D))
    expected = d.router_probs.gather(1, d.expert_indices)
    assert torch.allclose(d.combine_weights, expected)
    assert (d.combine_weights.sum(-1) < 1.0).all()


@pytest.mark.parametrize(("top_k", "cf"), [(1, 1.0), (2, 0.5), (2, 1.0), (3, 0.75)])
def test_topk_capacity_matches_reference(top_k: int, cf: float) -> None:
    torch.manual_seed(top_k)
    router = TopKRouter(D, E, top_k=top_k, capacity_factor=cf)
    x = _skewed(router)
    d = router(x)
    _check(d)
    assert d.capacity == capacity_for(cf, 64, top_k, E) == math.ceil(cf * 64 * top_k / E)
    assert (d.tokens_per_expert <= d.capacity).all()
    kept = reference_keep(d.expert_indices, torch.ones_like(d.slot_mask), d.capacity, E)
    assert torch.equal(d.slot_mask, kept)
    assert torch.equal(d.dropped, ~kept)
    assert d.dropped.any(), "skewed input should overflow expert 0"
    assert (d.combine_weights[d.dropped] == 0).all()
    assert d.drop_rate() == pytest.approx(float(d.dropped.sum()) / (64 * top_k))


def test_switch_drops_in_token_order_and_keeps_router_prob() -> None:
    torch.manual_seed(3)
    router = SwitchRouter(D, E, capacity_factor=1.0, eval_capacity_factor=2.0)
    x = _skewed(router)
    d = router(x)  # training mode: capacity_factor 1.0
    assert d.capacity == 8
    idx = d.expert_indices[:, 0]
    for e in range(E):
        tokens = (idx == e).nonzero().flatten()
        kept = d.slot_mask[tokens, 0]
        n_keep = min(len(tokens), d.capacity)
        assert kept[:n_keep].all() and not kept[n_keep:].any()
        assert d.dropped[tokens, 0][n_keep:].all() and not d.dropped[tokens, 0][:n_keep].any()
    prob = d.router_probs.gather(1, d.expert_indices)
    assert torch.equal(d.combine_weights, torch.where(d.slot_mask, prob, torch.zeros_like(prob)))
    router.eval()
    assert router(x).capacity == 16


def test_switch_dropless_and_jitter() -> None:
    torch.manual_seed(0)
    router = SwitchRouter(D, E, capacity_factor=None, eval_capacity_factor=None, jitter_eps=0.1)
    x = torch.randn(32, D)
    d1, d2 = router(x), router(x)
    assert d1.capacity is None and d1.slot_mask.all() and not d1.dropped.any()
    assert not torch.equal(d1.router_logits, d2.router_logits), "jitter is applied in training"
    router.eval()
    assert torch.equal(router(x).router_logits, router(x).router_logits)
    assert torch.allclose(router(x).router_logits, x @ router.gate.weight.t(), atol=1e-5)


@pytest.mark.parametrize(("t", "cf", "k"), [(16, 1.0, 2), (10, 1.5, 1), (8, 4.0, 4)])
def test_expert_choice_exactly_c_tokens(t: int, cf: float, k: int) -> None:
    torch.manual_seed(t)
    router = ExpertChoiceRouter(D, E, top_k=k, capacity_factor=cf)
    d = router(torch.randn(t, D))
    _check(d)
    c = min(math.ceil(cf * t * k / E), t)
    assert d.capacity == c
    assert d.slot_mask.sum(0).tolist() == [c] * E
    assert d.tokens_per_expert.tolist() == [c] * E
    assert torch.equal(d.expert_indices, torch.arange(E).expand(t, E))
    assert torch.equal(d.combine_weights, torch.where(d.slot_mask, d.router_probs, torch.zeros(t, E)))
    # each expert picked its highest-probability tokens
    for e in range(E):
        picked = d.router_probs[d.slot_mask[:, e], e]
        others = d.router_probs[~d.slot_mask[:, e], e]
        if len(others):
            assert picked.min() >= others.max()
    assert not d.dropped.any()


def test_sigmoid_bias_selection_only() -> None:
    torch.manual_seed(0)
    router = SigmoidBiasRouter(D, E, top_k=2)
    x = torch.randn(10, D)
    d = router(x)
    scores = torch.sigmoid(d.router_logits)
    assert torch.allclose(d.router_probs, scores)
    assert torch.equal(d.expert_indices, torch.topk(scores, 2, -1).indices)
    assert torch.allclose(d.combine_weights.sum(-1), torch.ones(10), atol=1e-6)
    router.expert_bias[5] = 10.0  # force expert 5 into every token's top-k
    d = router(x)
    assert (d.expert_indices == 5).any(-1).all()
    chosen = scores.gather(1, d.expert_indices)
    assert torch.allclose(d.combine_weights, chosen / chosen.sum(-1, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid_bias", "top_k", "switch"])
def test_update_bias_moves_load_toward_balance(kind: str) -> None:
    torch.manual_seed(0)
    kw = {"capacity_factor": None} if kind == "switch" else {}
    router = build_router(kind, D, E, 1 if kind == "switch" else 2, **kw)
    assert torch.equal(router.expert_bias, torch.zeros(E))
    x = _skewed(router, t=128)
    with torch.no_grad():
        start = router(x).tokens_per_expert.float()
        for i in range(100):  # a decaying step, as a schedule would give
            router.update_bias(router(x).tokens_per_expert, rate=0.05 * 0.97**i)
        end = router(x).tokens_per_expert.float()
    assert end.max() < 0.6 * start.max(), (start, end)
    assert end.std() < 0.5 * start.std()


def test_update_bias_formula() -> None:
    router = TopKRouter(D, 4, top_k=1, bias_update_rate=0.5)
    router.update_bias(torch.tensor([3, 1, 2, 2]))
    assert router.expert_bias.tolist() == [-0.5, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="tokens_per_expert"):
        router.update_bias(torch.tensor([1, 2]))


@pytest.mark.parametrize("kind", ["top_k", "switch", "expert_choice", "sigmoid_bias"])
def test_padding_is_ignored(kind: str) -> None:
    torch.manual_seed(1)
    k = 1 if kind == "switch" else 2
    kw = {"capacity_factor": 1.0} if kind in ("switch", "top_k") else {}
    router = build_router(kind, D, E, k, **kw)
    t = 24
    x = torch.randn(t, D)
    mask = torch.ones(t, dtype=torch.bool)
    mask[::3] = False
    d = router(x, token_mask=mask)
    _check(d)
    assert not d.slot_mask[~mask].any() and not d.dropped[~mask].any()
    assert (d.combine_weights[~mask] == 0).all()
    assert int(d.tokens_per_expert.sum()) == int(d.slot_mask.sum())
    assert torch.equal(d.token_mask, mask)
    # the valid tokens get the same decision as without the padding tokens at all
    d_valid = router(x[mask])
    assert torch.equal(d.slot_mask[mask], d_valid.slot_mask)
    assert torch.equal(d.tokens_per_expert, d_valid.tokens_per_expert)
    assert d.capacity == d_valid.capacity


def test_gate_gets_gradient_and_fp32_math_with_bf16_input() -> None:
    torch.manual_seed(0)
    router = TopKRouter(D, E, top_k=2)
    d = router(torch.randn(6, D, dtype=torch.bfloat16))
    assert d.router_logits.dtype == torch.float32 and d.combine_weights.dtype == torch.float32
    d.combine_weights.square().sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: build_router("nope", D, E, 2), "router_type"),
        (lambda: build_router("top_k", D, E, E + 1), "top_k"),
        (lambda: build_router("top_k", D, E, 0), "top_k"),
        (lambda: build_router("switch", D, E, 2), "top_k"),
        (lambda: build_router("top_k", D, E, 2, capacity_factor=0.0), "capacity_factor"),
        (lambda: build_router("top_k", D, E, 2, eval_capacity_factor=-1.0), "eval_capacity_factor"),
        (lambda: build_router("switch", D, E, 1, capacity_factor=-2), "capacity_factor"),
        (lambda: build_router("expert_choice", D, E, 2, capacity_factor=0), "capacity_factor"),
        (lambda: build_router("top_k", D, E, 2, jitter_eps=1.5), "jitter_eps"),
        (lambda: build_router("top_k", 0, E, 1), "hidden_size"),
        (lambda: build_router("top_k", D, 0, 1), "num_experts"),
        (lambda: TopKRouter(D, E)(torch.randn(3, D + 1)), "router input"),
        (
            lambda: TopKRouter(D, E)(torch.randn(3, D), token_mask=torch.ones(4, dtype=torch.bool)),
            "token_mask",
        ),
    ],
)
def test_bad_arguments_name_the_argument(call, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        call()


def test_detach_and_drop_rate() -> None:
    router = SwitchRouter(D, E, capacity_factor=1.0)
    d = router(_skewed(router))
    dd = d.detach()
    assert isinstance(dd, RoutingDecision) and not dd.router_logits.requires_grad
    assert 0.0 < d.drop_rate() < 1.0


@pytest.mark.parametrize("seed", range(3))
def test_all_kept_decision_reads_like_the_full_one(seed: int) -> None:
    # the dropless fast path leaves the masks and counts out; read, they equal what the constructor gets
    g = torch.Generator().manual_seed(seed)
    t, e, k = 9, 6, 2
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w, logits = torch.rand(t, k, generator=g), torch.randn(t, e, generator=g)
    lazy = RoutingDecision.all_kept_decision(idx, w, logits, logits.softmax(-1))
    assert lazy.all_kept
    assert torch.equal(lazy.tokens_per_expert, torch.bincount(idx.reshape(-1), minlength=e))
    assert lazy.all_kept  # the counts do not need the mask
    assert torch.equal(lazy.slot_mask, torch.ones(t, k, dtype=torch.bool))
    assert not lazy.all_kept  # read once: now an ordinary decision
    assert torch.equal(lazy.dropped, torch.zeros(t, k, dtype=torch.bool))
    _check(lazy)
    full = RoutingDecision(
        idx, w, torch.ones(t, k, dtype=torch.bool), torch.zeros(t, k, dtype=torch.bool), logits,
        logits.softmax(-1), torch.bincount(idx.reshape(-1), minlength=e),
    )  # fmt: skip
    assert not full.all_kept
    copy = dataclasses.replace(RoutingDecision.all_kept_decision(idx, w, logits, logits), capacity=4)
    assert copy.capacity == 4 and torch.equal(copy.slot_mask, full.slot_mask)
    assert RoutingDecision.all_kept_decision(idx, w, logits, logits).detach().drop_rate() == 0.0
    # a mask written by a caller stays the caller's (it is an ordinary tensor once read)
    other = RoutingDecision.all_kept_decision(idx, w, logits, logits)
    other.slot_mask[0, 0] = False
    assert not RoutingDecision.all_kept_decision(idx, w, logits, logits).slot_mask.logical_not().any()


def test_eval_routers_take_the_all_kept_path_only_without_capacity_or_padding() -> None:
    x = torch.randn(5, 16)
    assert TopKRouter(16, 4, top_k=2).eval()(x).all_kept
    assert not TopKRouter(16, 4, top_k=2, capacity_factor=1.0).eval()(x).all_kept
    assert not TopKRouter(16, 4, top_k=2).eval()(x, token_mask=torch.tensor([1, 1, 0, 1, 1]).bool()).all_kept
