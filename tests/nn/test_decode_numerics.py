"""Decode-time shortcuts give exactly the numbers of the general code: router without gradients, RMSNorm."""

from __future__ import annotations

import pytest
import torch

from moe_lab.nn.router import SigmoidBiasRouter, SwitchRouter, TopKRouter
from moe_lab.nn.routing import RoutingDecision
from moe_lab.nn.transformer import RMSNorm

D, E = 32, 8


def _fields(d: RoutingDecision) -> list[object]:
    return [d.expert_indices, d.combine_weights, d.slot_mask, d.dropped, d.router_logits, d.router_probs,
            d.tokens_per_expert, d.capacity, d.token_mask]  # fmt: skip


def _assert_same(a: RoutingDecision, b: RoutingDecision) -> None:
    for x, y in zip(_fields(a), _fields(b)):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype
            assert torch.equal(x.detach(), y.detach())
        else:
            assert x == y


def _reference(
    router: TopKRouter | SigmoidBiasRouter, x: torch.Tensor, mask: torch.Tensor | None
) -> RoutingDecision:
    """The general path (autograd on): selection on ``scores + bias``, weights gathered from the scores."""
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        return router(x, token_mask=mask)


ROUTERS = [
    lambda: TopKRouter(D, E, top_k=2),
    lambda: TopKRouter(D, E, top_k=3, norm_topk_prob=False),
    lambda: TopKRouter(D, E, top_k=2, capacity_factor=1.0),
    lambda: SwitchRouter(D, E, capacity_factor=None, eval_capacity_factor=None),
    lambda: SigmoidBiasRouter(D, E, top_k=2, routed_scaling_factor=2.5),
]


@pytest.mark.parametrize("make", ROUTERS)
@pytest.mark.parametrize("t", [1, 8, 37])
@pytest.mark.parametrize("masked", [False, True])
def test_router_without_grad_matches_general_path(make, t: int, masked: bool) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(t)
    router = make().eval()
    x = torch.randn(t, D)
    mask = (torch.rand(t) > 0.3) if masked else None
    ref = _reference(router, x, mask)
    with torch.inference_mode():
        _assert_same(router(x, token_mask=mask), ref)
    with torch.no_grad():
        _assert_same(router(x, token_mask=mask), ref)


@pytest.mark.parametrize("make", [ROUTERS[0], ROUTERS[4]])
def test_router_bias_changes_are_seen_in_eval(make) -> None:  # type: ignore[no-untyped-def]
    """The zero-bias shortcut is cached per bias version: updates, loads and replacements invalidate it."""
    torch.manual_seed(0)
    router = make().eval()
    x = torch.randn(16, D)
    with torch.no_grad():
        router(x)  # caches "bias is zero"
        router.update_bias(torch.tensor([100, 0, 0, 0, 0, 0, 0, 0]), rate=0.5)  # in place
        _assert_same(router(x), _reference(router, x, None))
        assert not (router(x).expert_indices == 0).any()  # expert 0 is now strongly penalised
        router.load_state_dict({**router.state_dict(), "expert_bias": torch.zeros(E)})
        _assert_same(router(x), _reference(router, x, None))
        router.expert_bias = torch.full((E,), -0.25)  # a new tensor
        router.expert_bias[3] = 0.5
        d = router(x)
        _assert_same(d, _reference(router, x, None))
        assert (d.expert_indices == 3).any(dim=-1).all()


def test_router_training_still_differentiable() -> None:
    router = TopKRouter(D, E, top_k=2).train()
    x = torch.randn(8, D)
    d = router(x)
    d.combine_weights.sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def _old_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Hugging Face Llama RMSNorm formula (what every RMSNorm path must reproduce bit for bit)."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


@pytest.mark.parametrize("shape", [(8, 1, 256), (1, 1, 64), (3, 7, 64), (2, 5, 4, 32), (5, 4096)])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_rmsnorm_inference_bit_identical_to_formula(shape: tuple[int, ...], eps: float) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    norm = RMSNorm(shape[-1], eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    for i in range(20):
        scale = 10.0 ** (i % 7 - 3)  # 1e-3 .. 1e3: eps matters at the small end
        x = torch.randn(shape, generator=g) * scale
        ref = _old_rmsnorm(x, norm.weight.detach(), eps)
        with torch.inference_mode():
            assert torch.equal(norm(x), ref)
        with torch.no_grad():
            assert torch.equal(norm(x), ref)
        assert torch.equal(norm(x).detach(), ref)  # with autograd (the training kernel)


def test_rmsnorm_inference_other_dtypes_unchanged() -> None:
    norm = RMSNorm(16)
    x = torch.randn(4, 16).bfloat16()
    with torch.no_grad():
        out = norm(x)
    assert out.dtype == torch.float32  # fp32 weight times the bf16 normalised input (as HF)
    assert torch.equal(out, _old_rmsnorm(x, norm.weight.detach(), norm.eps))
