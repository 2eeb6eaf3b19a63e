"""Dispatch fast paths vs the per-slot python reference: outputs and all gradients."""

from __future__ import annotations

import pytest
import torch
from _moe_reference import reference_moe

from moe_lab.nn.dispatch import (
    ROW_MULTIPLE_SHAPES,
    _run_aligned,
    dispatch_combine,
    moe_capacity,
    plan_dispatch,
    row_multiple,
)
from moe_lab.nn.experts import Experts, has_grouped_mm
from moe_lab.nn.router import ExpertChoiceRouter, SigmoidBiasRouter, SwitchRouter, TopKRouter

IMPLS = ["loop", "capacity"] + (["grouped_mm", "auto"] if has_grouped_mm() else ["auto"])


def _setup(router_kind: str, t: int, e: int, k: int, activation: str, seed: int, d: int = 12, f: int = 20):
    torch.manual_seed(seed)
    if router_kind == "top_k":
        router = TopKRouter(d, e, top_k=k)
    elif router_kind == "top_k_capacity":
        router = TopKRouter(d, e, top_k=k, capacity_factor=0.75)
    elif router_kind == "switch":
        router = SwitchRouter(d, e, capacity_factor=1.0)
    elif router_kind == "expert_choice":
        router = ExpertChoiceRouter(d, e, top_k=k)
    else:
        router = SigmoidBiasRouter(d, e, top_k=k)
    with torch.no_grad():
        router.gate.weight.mul_(20.0)  # peaked routing
        if router_kind != "expert_choice":
            router.expert_bias[-1] = -10.0  # the last expert is never selected: an empty group
    experts = Experts(e, d, f, activation=activation, init_std=0.3)
    x = torch.randn(t, d)
    return router, experts, x


def _run(router, experts, x, fn, dtype=torch.float32, seed=123):
    for p in [*router.parameters(), *experts.parameters()]:
        p.grad = None
    xr = x.clone().to(dtype).requires_grad_(True)
    decision = router(xr)
    out = fn(xr, decision)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    (out * g).sum().backward()
    grads = {"x": xr.grad, "gate": router.gate.weight.grad}
    for name, p in experts.named_parameters():
        grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return out, grads, decision


def _reference_fn(experts, capacity=None):
    def fn(x, d):
        return reference_moe(
            x, d.expert_indices, d.combine_weights, d.slot_mask,
            experts.w1_EDF, experts.w3_EDF, experts.w2_EFD, capacity=capacity,
        )  # fmt: skip

    return fn


def _assert_close(a, b, atol, rtol):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("router_kind", "t", "e", "k", "activation"),
    [
        ("top_k", 7, 8, 2, "swiglu"),
        ("top_k", 3, 8, 1, "gelu"),
        ("top_k_capacity", 16, 4, 2, "swiglu"),
        ("switch", 9, 4, 1, "gelu"),
        ("expert_choice", 10, 4, 2, "swiglu"),
        ("sigmoid_bias", 6, 6, 3, "swiglu"),
    ],
)
def test_fast_paths_match_reference(impl, seed, router_kind, t, e, k, activation) -> None:
    router, experts, x = _setup(router_kind, t, e, k, activation, seed)
    ref_out, ref_grads, decision = _run(router, experts, x, _reference_fn(experts))
    out, grads, _ = _run(router, experts, x, lambda xx, d: dispatch_combine(xx, d, experts, impl=impl))
    _assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, ref in ref_grads.items():
        _assert_close(grads[name], ref, atol=1e-5, rtol=1e-5)
    if router_kind != "expert_choice":
        assert decision.tokens_per_expert[-1] == 0, "the last expert should stay empty"


@pytest.mark.parametrize("capacity", [1, 2, 3])
def test_capacity_path_drops_overflow_in_token_order(capacity: int) -> None:
    router, experts, x = _setup("top_k", 12, 4, 2, "swiglu", seed=capacity)
    ref_out, ref_grads, d = _run(router, experts, x, _reference_fn(experts, capacity=capacity))
    assert int(d.tokens_per_expert.max()) > capacity
    out, grads, _ = _run(router, experts, x, lambda xx, dd: moe_capacity(xx, dd, experts, capacity=capacity))
    _assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, ref in ref_grads.items():
        _assert_close(grads[name], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_matches_fp32_reference_loosely(impl: str) -> None:
    router, experts, x = _setup("top_k", 24, 8, 2, "swiglu", seed=5, d=32, f=48)
    ref_out, ref_grads, _ = _run(router, experts, x, _reference_fn(experts))
    experts_bf16 = Experts(8, 32, 48, init_std=0.3).to(torch.bfloat16)
    experts_bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in experts.state_dict().items()})
    out, grads, _ = _run(
        router,
        experts_bf16,
        x,
        lambda xx, d: dispatch_combine(xx, d, experts_bf16, impl=impl),
        torch.bfloat16,
    )
    assert out.dtype == torch.bfloat16
    scale = ref_out.abs().max()
    assert (out.float() - ref_out).abs().max() < 0.03 * scale
    for name in ("w1_EDF", "w3_EDF", "w2_EFD", "x"):
        ref = ref_grads[name]
        assert (grads[name].float() - ref).abs().max() < 0.05 * ref.abs().max(), name


def test_plan_sorts_by_expert_in_token_order_and_skips_masked_slots() -> None:
    router, _, x = _setup("top_k_capacity", 16, 4, 2, "swiglu", seed=0)
    d = router(x)
    plan = plan_dispatch(d)
    assert plan.counts == d.tokens_per_expert.tolist()
    assert torch.equal(plan.expert_N, torch.sort(plan.expert_N).values)
    for e in range(4):
        toks = plan.token_idx_N[plan.expert_N == e]
        assert torch.equal(toks, torch.sort(toks).values)
    assert len(plan.token_idx_N) == int(d.slot_mask.sum())


def test_all_padding_gives_zero_output() -> None:
    router, experts, x = _setup("top_k", 5, 4, 2, "swiglu", seed=0)
    d = router(x, token_mask=torch.zeros(5, dtype=torch.bool))
    for impl in IMPLS:
        assert torch.equal(dispatch_combine(x, d, experts, impl=impl), torch.zeros_like(x))


def test_bad_impl() -> None:
    router, experts, x = _setup("top_k", 5, 4, 2, "swiglu", seed=0)
    with pytest.raises(ValueError, match="impl"):
        dispatch_combine(x, router(x), experts, impl="fast")


def test_prefer_padded_rule() -> None:
    from moe_lab.nn.dispatch import prefer_padded

    balanced = [64] * 8
    assert prefer_padded(balanced, num_threads=2)  # 64 rows per expert, no padding
    assert not prefer_padded(balanced, num_threads=1)  # one thread: the per-expert loop is faster
    assert not prefer_padded([1024] * 8, num_threads=2)  # large blocks: matmuls efficient already
    assert not prefer_padded([100, 30, 30, 30, 30, 30, 30, 30], num_threads=2)  # 2.6x padding at 39 rows
    assert prefer_padded([12, 1, 2, 0, 5, 9, 3, 4], num_threads=2)  # tiny blocks: padding is cheap
    assert not prefer_padded([0] * 8, num_threads=4)


@pytest.mark.parametrize(("router_kind", "activation"), [("top_k", "swiglu"), ("sigmoid_bias", "gelu")])
def test_auto_padded_layout_matches_reference(router_kind, activation, monkeypatch) -> None:
    """``impl="auto"`` with several threads and small expert blocks takes the padded batched-matmul layout;
    outputs and every gradient still match the per-slot reference (and nothing is dropped)."""
    import moe_lab.nn.dispatch as dispatch

    calls = []
    real = dispatch._run_padded
    monkeypatch.setattr(dispatch, "_run_padded", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr(dispatch, "prefer_padded", lambda counts: True)
    router, experts, x = _setup(router_kind, 40, 8, 3, activation, seed=5)
    ref_out, ref_grads, _ = _run(router, experts, x, _reference_fn(experts))
    out, grads, decision = _run(router, experts, x, lambda xr, d: dispatch_combine(xr, d, experts, "auto"))
    plan = plan_dispatch(decision, 8)
    assert calls == [max(plan.counts)]  # capacity = the largest block: dropless
    _assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    for name in ref_grads:
        _assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["loop"] + (["grouped_mm"] if has_grouped_mm() else []))
@pytest.mark.parametrize("multiple", [1, 4, 128])
@pytest.mark.parametrize(("router_kind", "t", "e", "k"), [("top_k", 7, 8, 2), ("sigmoid_bias", 13, 6, 3)])
def test_row_aligned_layout_matches_reference(impl, multiple, router_kind, t, e, k) -> None:
    # the layout bfloat16 / float16 take on CPU (blocks padded with zero rows), checked exactly in float32
    router, experts, x = _setup(router_kind, t, e, k, "swiglu", seed=multiple)
    ref_out, ref_grads, decision = _run(router, experts, x, _reference_fn(experts))
    assert decision.tokens_per_expert[-1] == 0  # an empty block: padded to 0 rows

    def aligned(xx, d):
        return _run_aligned(xx, plan_dispatch(d, e), experts, multiple, impl)

    out, grads, _ = _run(router, experts, x, aligned)
    _assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, ref in ref_grads.items():
        _assert_close(grads[name], ref, atol=1e-5, rtol=1e-5)


def test_low_precision_cpu_blocks_are_padded_to_the_row_multiple(monkeypatch) -> None:
    router, experts, x = _setup("top_k", 96, 8, 2, "swiglu", seed=5, d=32, f=48)
    experts = experts.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    decision = router(xb)
    most = int(decision.tokens_per_expert.max())
    multiple = row_multiple(xb, most)
    assert multiple > 1 and row_multiple(x, most) == 1 and row_multiple(xb, ROW_MULTIPLE_SHAPES) == 1
    assert most / ROW_MULTIPLE_SHAPES <= multiple < 2 * most / ROW_MULTIPLE_SHAPES
    grouped: list[list[int]] = []
    padded: list[int] = []
    forward, forward_capacity = Experts.forward, Experts.forward_capacity

    def spy(self, x_ND, counts, impl="auto"):
        grouped.append(list(counts))
        return forward(self, x_ND, counts, impl)

    def spy_capacity(self, x_ECD):
        padded.append(x_ECD.shape[1])
        return forward_capacity(self, x_ECD)

    monkeypatch.setattr(Experts, "forward", spy)
    monkeypatch.setattr(Experts, "forward_capacity", spy_capacity)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the grouped layout: each block padded
        dispatch_combine(xb, decision, experts)
        torch.set_num_threads(2)  # the batched layout: one capacity, rounded up
        dispatch_combine(xb, decision, experts)
    finally:
        torch.set_num_threads(threads)
    assert grouped and all(c % multiple == 0 for c in grouped[0]) and sum(grouped[0]) > 0
    assert padded and padded[0] % multiple == 0 and padded[0] >= most


def test_row_aligned_layout_with_lora_experts_matches_the_plain_dispatch() -> None:
    from moe_lab.finetune.lora_layers import LoRAExperts

    router, experts, x = _setup("top_k", 11, 8, 2, "swiglu", seed=9)
    lora = LoRAExperts(experts, rank=4, alpha=8.0, dropout=0.0, expert_wise=True, weights=["w1", "w3", "w2"])
    with torch.no_grad():
        for b in lora.lora_B.values():
            b.normal_()  # a non-zero update
    ref, ref_grads, _ = _run(router, lora, x, lambda xx, d: dispatch_combine(xx, d, lora, impl="loop"))
    out, grads, _ = _run(
        router, lora, x, lambda xx, d: _run_aligned(xx, plan_dispatch(d, 8), lora, 16, "loop")
    )
    _assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, g in ref_grads.items():
        _assert_close(grads[name], g, atol=1e-5, rtol=1e-5)
