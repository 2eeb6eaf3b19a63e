"""The small-batch (decode) MoE path against the grouped dispatch and the plain per-slot reference."""

from __future__ import annotations

import pytest
import torch
from _moe_reference import reference_moe

from moe_lab.nn.decode_path import small_batch_method, small_batch_moe
from moe_lab.nn.dispatch import dispatch_combine
from moe_lab.nn.experts import Experts
from moe_lab.nn.moe import MoELayer
from moe_lab.nn.router import RoutingDecision, SwitchRouter, TopKRouter


def _setup(seed: int, t: int, e: int, k: int, activation: str = "swiglu", d: int = 32, f: int = 48):
    torch.manual_seed(seed)
    experts = Experts(e, d, f, activation=activation, init_std=0.2)
    router = TopKRouter(d, e, top_k=k)
    torch.nn.init.normal_(router.gate.weight, std=0.5)
    x_TD = torch.randn(t, d)
    return experts, router, x_TD


def _reference(x_TD: torch.Tensor, decision: RoutingDecision, experts: Experts) -> torch.Tensor:
    return reference_moe(
        x_TD,
        decision.expert_indices,
        decision.combine_weights,
        decision.slot_mask,
        experts.w1_EDF.to(x_TD.dtype),
        None if experts.w3_EDF is None else experts.w3_EDF.to(x_TD.dtype),
        experts.w2_EFD.to(x_TD.dtype),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("t", [1, 8])
@pytest.mark.parametrize(("e", "k"), [(4, 2), (8, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("method", ["dense", "pairs", "grouped", "padded"])
def test_fp32_matches_dispatch_and_reference(seed: int, t: int, e: int, k: int, method: str) -> None:
    experts, router, x_TD = _setup(seed, t, e, k)
    with torch.no_grad():
        decision = router(x_TD)
        got = small_batch_moe(x_TD, decision, experts, method)
        grouped = dispatch_combine(x_TD, decision, experts)
        ref = _reference(x_TD, decision, experts)
    assert got.shape == x_TD.shape and got.dtype == x_TD.dtype
    # fp32, different summation orders (batched vs per-row matmuls): a few ulp of outputs of size ~1
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, grouped, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("t", [1, 8])
@pytest.mark.parametrize("method", ["dense", "pairs", "grouped", "padded"])
def test_bf16_close_to_fp32_reference(seed: int, t: int, method: str) -> None:
    experts, router, x_TD = _setup(seed, t, 4, 2)
    with torch.no_grad():
        decision = router(x_TD)
        x16 = x_TD.to(torch.bfloat16)
        got = small_batch_moe(x16, decision, experts, method)
        grouped = dispatch_combine(x16, decision, experts)
        ref = _reference(x_TD, decision, experts)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(got.float(), grouped.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("method", ["dense", "pairs", "grouped", "padded"])
def test_gelu_experts_padding_and_dropped_slots_contribute_nothing(method: str) -> None:
    experts, _, x_TD = _setup(3, 8, 4, 1, activation="gelu")
    router = SwitchRouter(32, 4, capacity_factor=0.5)  # capacity 1 per expert: most slots dropped
    torch.nn.init.normal_(router.gate.weight, std=0.5)
    token_mask = torch.tensor([True, False, True, True, False, True, True, True])
    with torch.no_grad():
        decision = router(x_TD, token_mask=token_mask)
        assert bool((~decision.slot_mask).any())
        got = small_batch_moe(x_TD, decision, experts, method)
        ref = _reference(x_TD, decision, experts)
        grouped = dispatch_combine(x_TD, decision, experts)
    # fp32, different summation orders (batched vs per-row matmuls): a few ulp of outputs of size ~1
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, grouped, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[~token_mask], torch.zeros_like(got[~token_mask]))


@pytest.mark.parametrize(
    ("experts_TK", "keep_TK"),
    [
        ([[2, 5]], [[True, True]]),  # one token, two experts: step 3, no gather
        ([[5, 2]], [[True, True]]),  # the same experts in the other order
        ([[1, 5], [3, 7]], [[True, True], [True, True]]),  # experts 1, 3, 5, 7: step 2
        ([[0, 3], [6, 3]], [[True, True], [True, False]]),  # step 3, a dropped slot
        ([[1, 2], [2, 1]], [[True, True], [False, True]]),  # every block full: a padding row is added
        ([[4, 6]], [[False, False]]),  # nothing kept
    ],
)
def test_padded_reads_only_the_touched_experts(experts_TK: list, keep_TK: list) -> None:
    """The padded method's strided expert views and host-side layout against the per-slot reference."""
    experts, _, _ = _setup(7, 1, 8, 2)
    t = len(experts_TK)
    x_TD = torch.randn(t, 32)
    keep = torch.tensor(keep_TK)
    idx = torch.tensor(experts_TK)
    weights = torch.rand(t, 2).masked_fill(~keep, 0.0)
    decision = RoutingDecision(
        expert_indices=idx,
        combine_weights=weights,
        slot_mask=keep,
        dropped=~keep,
        router_logits=torch.zeros(t, 8),
        router_probs=torch.full((t, 8), 1 / 8),
        tokens_per_expert=torch.bincount(idx[keep], minlength=8),
    )
    with torch.no_grad():
        got = small_batch_moe(x_TD, decision, experts, "padded")
        ref = _reference(x_TD, decision, experts)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[~keep.any(1)], torch.zeros_like(got[~keep.any(1)]))


def test_method_choice() -> None:
    assert small_batch_method(1, 2, 4, training=False) == "dense"  # few experts: compute them all
    assert small_batch_method(8, 2, 4, training=False) == "dense"
    assert small_batch_method(1, 2, 8, training=False) == "pairs"  # one token, many experts
    assert small_batch_method(8, 2, 8, training=False) == "grouped"  # decode batch, many experts
    assert small_batch_method(32, 2, 8, training=False) == "grouped"
    assert small_batch_method(33, 2, 8, training=False) is None  # grouped dispatch
    assert small_batch_method(1, 2, 4, training=True) is None
    assert small_batch_method(0, 2, 4, training=False) is None
    # several CPU threads: batched matmuls over all experts once most experts are touched
    assert small_batch_method(8, 2, 8, training=False, num_threads=2) == "padded"
    assert small_batch_method(4, 2, 8, training=False, num_threads=2) == "padded"  # 8 slots, 8 experts
    assert (
        small_batch_method(2, 2, 8, training=False, num_threads=2) == "pairs"
    )  # 4 slots: few experts touched
    assert small_batch_method(4, 8, 64, training=False, num_threads=2) == "grouped"  # 32 slots, 64 experts
    assert small_batch_method(8, 8, 64, training=False, num_threads=2) == "padded"
    assert small_batch_method(8, 2, 4, training=False, num_threads=2) == "dense"
    assert small_batch_method(33, 2, 8, training=False, num_threads=2) is None


@pytest.mark.parametrize("t", [8, 20])
def test_grouped_is_bit_identical_to_the_dispatch(t: int) -> None:
    """Same slot order and matmul blocks as the grouped dispatch: exactly the same numbers."""
    experts, router, x_TD = _setup(4, t, 8, 2, d=64, f=96)  # 16-byte rows: the torch._grouped_mm branch
    with torch.no_grad():
        decision = router(x_TD)
        assert torch.equal(
            small_batch_moe(x_TD, decision, experts, "grouped"),
            dispatch_combine(x_TD, decision, experts, "grouped_mm"),
        )  # "auto" may pick the padded layout (several threads), which rounds differently
        odd = Experts(8, 30, 50, init_std=0.2)  # rows not 16-byte multiples: the per-expert loop branch
        x30 = x_TD[:, :30].contiguous()
        d30 = TopKRouter(30, 8, top_k=2)(x30)
        torch.testing.assert_close(
            small_batch_moe(x30, d30, odd, "grouped"), _reference(x30, d30, odd), rtol=0, atol=1e-6
        )


def test_grouped_with_every_slot_dropped_is_zero() -> None:
    experts, _, x_TD = _setup(5, 4, 8, 1)
    router = SwitchRouter(32, 8, capacity_factor=0.5)
    with torch.no_grad():
        decision = router(x_TD, token_mask=torch.zeros(4, dtype=torch.bool))
        got = small_batch_moe(x_TD, decision, experts, "grouped")
    assert torch.equal(got, torch.zeros_like(x_TD))


def test_bad_arguments() -> None:
    experts, router, x_TD = _setup(0, 2, 4, 2)
    decision = router(x_TD)
    with pytest.raises(ValueError, match="method"):
        small_batch_moe(x_TD, decision, experts, "nope")
    with pytest.raises(ValueError, match="2 tokens"):
        small_batch_moe(x_TD[:1], decision, experts)


@pytest.mark.parametrize("e", [4, 8])
@pytest.mark.parametrize("t", [1, 2, 8])
def test_moe_layer_eval_equals_grouped_path(e: int, t: int) -> None:
    torch.manual_seed(e + t)
    layer = MoELayer(32, 48, e, top_k=2, num_shared_experts=1, init_std=0.2).eval()
    x_BSD = torch.randn(t, 1, 32)
    with torch.no_grad():
        out, decision = layer(x_BSD)
        x_TD = x_BSD.reshape(-1, 32)
        grouped = dispatch_combine(x_TD, decision, layer.experts)
        assert layer.shared_experts is not None
        want = grouped + layer.shared_experts(x_TD)
    torch.testing.assert_close(out.reshape(-1, 32), want, rtol=0, atol=1e-6)


def test_moe_layer_takes_the_small_batch_path_only_in_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    import moe_lab.nn.moe as moe_module

    calls: list[str] = []
    real = moe_module.small_batch_moe

    def spy(x_TD, decision, experts, method=None, impl="auto"):
        calls.append(str(method))
        return real(x_TD, decision, experts, method, impl)

    monkeypatch.setattr(moe_module, "small_batch_moe", spy)
    layer = MoELayer(32, 48, 4, top_k=2)
    x = torch.randn(2, 1, 32)
    layer(x)  # training mode: grouped dispatch
    assert calls == []
    layer.eval()
    with torch.no_grad():
        layer(x)
        MoELayer(32, 48, 4, top_k=2, impl="capacity").eval()(x)  # the capacity layout keeps its own path
    assert calls == ["dense"]


def test_grouped_method_with_loop_impl_uses_plain_matmuls() -> None:
    """impl='loop' layers keep plain per-expert matmuls on the small-batch path too (FLOP counters see them)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    experts, router = Experts(8, 16, 32), TopKRouter(16, 8, top_k=2)
    x_TD = torch.randn(12, 16)
    decision = router(x_TD)
    with torch.no_grad():
        fast = small_batch_moe(x_TD, decision, experts, "grouped")
        with FlopCounterMode(display=False) as counter:
            loop = small_batch_moe(x_TD, decision, experts, "grouped", impl="loop")
    torch.testing.assert_close(loop, fast)
    assert counter.get_total_flops() == 2 * 24 * 3 * 16 * 32  # 24 slots x 3 matmuls of [1, 16] x [16, 32]


@pytest.mark.parametrize("method", ["dense", "pairs", "grouped", "padded"])
@pytest.mark.parametrize("t", [1, 3, 8])
def test_all_kept_decision_gives_the_same_bits(method: str, t: int) -> None:
    """The routers' dropless fast path (masks and counts made on first read, ``all_kept`` skips them) against
    the same decision built in full."""
    experts, router, x_TD = _setup(3, t, 8, 2)
    with torch.no_grad():
        lazy = router.eval()(x_TD)
        assert lazy.all_kept
        full = RoutingDecision(
            expert_indices=lazy.expert_indices,
            combine_weights=lazy.combine_weights,
            slot_mask=torch.ones_like(lazy.expert_indices, dtype=torch.bool),
            dropped=torch.zeros_like(lazy.expert_indices, dtype=torch.bool),
            router_logits=lazy.router_logits,
            router_probs=lazy.router_probs,
            tokens_per_expert=torch.bincount(lazy.expert_indices.reshape(-1), minlength=8),
        )
        got = small_batch_moe(x_TD, lazy, experts, method)
        want = small_batch_moe(x_TD, full, experts, method)
    assert torch.equal(got, want)
    torch.testing.assert_close(got, _reference(x_TD, full, experts), rtol=1e-5, atol=1e-5)
