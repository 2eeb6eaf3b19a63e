"""MoELayer: equivalences (one expert == dense FFN), shared experts, router input, padding, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_lab.nn.dispatch import dispatch_combine
from moe_lab.nn.experts import has_grouped_mm
from moe_lab.nn.moe import MoELayer
from moe_lab.nn.router import RoutingDecision

IMPLS = ["loop", "capacity", "auto"] + (["grouped_mm"] if has_grouped_mm() else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_one_expert_top1_equals_dense_ffn(impl: str, activation: str) -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 32, num_experts=1, top_k=1, activation=activation, impl=impl, init_std=0.2)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y, decision = layer(x)
    assert torch.allclose(decision.combine_weights, torch.ones(10, 1))
    w1, w2 = layer.experts.w1_EDF[0], layer.experts.w2_EFD[0]
    x2 = x.detach().clone().requires_grad_(True)
    if activation == "swiglu":
        dense = (F.silu(x2 @ w1) * (x2 @ layer.experts.w3_EDF[0])) @ w2
    else:
        dense = F.gelu(x2 @ w1) @ w2
    torch.testing.assert_close(y, dense, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.experts.named_parameters()}
    layer.zero_grad()
    (dense * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-5)
    for n, p in layer.experts.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("router_type", "top_k", "extra"),
    [
        ("top_k", 2, {}),
        ("top_k", 2, {"capacity_factor": 1.0, "eval_capacity_factor": 1.5}),
        ("top_k", 4, {"norm_topk_prob": False}),
        ("switch", 1, {"capacity_factor": 1.25, "jitter_eps": 0.01}),
        ("expert_choice", 2, {}),
        ("sigmoid_bias", 2, {}),
    ],
)
def test_impls_agree_for_every_router(router_type: str, top_k: int, extra: dict) -> None:
    torch.manual_seed(1)
    layers = {impl: MoELayer(16, 32, 8, top_k, router_type=router_type, impl=impl, **extra) for impl in IMPLS}
    ref = layers["loop"]
    for layer in layers.values():
        layer.load_state_dict(ref.state_dict())
        layer.eval()
    x = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:] = False
    y_ref, d_ref = ref(x, mask)
    assert y_ref.shape == x.shape and d_ref.expert_indices.shape[0] == 21
    for impl, layer in layers.items():
        y, d = layer(x, mask)
        torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5, msg=impl)
        assert torch.equal(d.slot_mask, d_ref.slot_mask)


def test_shared_experts_with_sigmoid_gate() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, 2, num_shared_experts=2, shared_expert_hidden_size=8, shared_expert_gate=True)
    assert layer.shared_experts.w1.weight.shape == (16, 16)
    assert layer.shared_expert_gate.weight.shape == (1, 16)
    x = torch.randn(2, 3, 16)
    y, d = layer(x)
    x_TD = x.reshape(-1, 16)
    routed = dispatch_combine(x_TD, d, layer.experts)
    shared = torch.sigmoid(x_TD @ layer.shared_expert_gate.weight.t()) * layer.shared_experts(x_TD)
    torch.testing.assert_close(y.reshape(-1, 16), routed + shared)
    plain = MoELayer(16, 32, 4, 2)
    assert plain.shared_experts is None and plain.shared_expert_gate is None


def test_router_input_override_routes_but_experts_see_x() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 8, 2)
    x = torch.randn(2, 4, 16)
    task = torch.randn(16) * 5
    y, d = layer(x, router_input_BSD=x + task)
    d_direct = layer.router((x + task).reshape(-1, 16))
    assert torch.equal(d.expert_indices, d_direct.expert_indices)
    torch.testing.assert_close(y.reshape(-1, 16), dispatch_combine(x.reshape(-1, 16), d, layer.experts))
    _, d_plain = layer(x)
    assert not torch.equal(d.router_logits, d_plain.router_logits)


def test_padding_positions_get_zero_output_and_are_not_counted() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, 2)
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    y, d = layer(x, mask)
    assert (y[~mask] == 0).all() and (y[mask] != 0).any()
    assert int(d.tokens_per_expert.sum()) == 10 * 2
    assert torch.equal(d.token_mask, mask.reshape(-1))


def test_bf16_layer_forward_backward() -> None:
    torch.manual_seed(0)
    layer = MoELayer(32, 64, 8, 2, num_shared_experts=1).to(torch.bfloat16)
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16, requires_grad=True)
    y, d = layer(x)
    assert y.dtype == torch.bfloat16 and d.router_logits.dtype == torch.float32
    y.float().square().sum().backward()
    assert x.grad is not None and layer.experts.w1_EDF.grad.dtype == torch.bfloat16
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_forward_hook_sees_decision_and_attributes() -> None:
    layer = MoELayer(16, 32, 4, 2)
    seen: list[RoutingDecision] = []
    layer.register_forward_hook(lambda mod, args, out: seen.append(out[1]))
    layer(torch.randn(1, 3, 16))
    assert len(seen) == 1 and seen[0].num_experts == 4
    assert layer.router.gate.weight.shape == (4, 16)
    assert layer.experts.w1_EDF.shape == (4, 16, 32) and layer.experts.w2_EFD.shape == (4, 32, 16)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"router_type": "hash"}, "router_type"),
        ({"impl": "triton"}, "impl"),
        ({"top_k": 9}, "top_k"),
        ({"router_type": "switch"}, "top_k"),
        ({"router_type": "expert_choice", "jitter_eps": 0.1}, "jitter_eps"),
        ({"router_type": "sigmoid_bias", "capacity_factor": 1.0}, "capacity_factor"),
        ({"router_type": "sigmoid_bias", "eval_capacity_factor": 1.0}, "eval_capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"shared_expert_gate": True}, "shared_expert_gate"),
        ({"num_shared_experts": -1}, "num_shared_experts"),
        ({"activation": "tanh"}, "activation"),
    ],
)
def test_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        MoELayer(16, 32, 8, **kwargs)


def test_bad_inputs() -> None:
    layer = MoELayer(16, 32, 4, 2)
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="token_mask"):
        layer(torch.randn(2, 3, 16), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="router_input"):
        layer(torch.randn(2, 3, 16), router_input_BSD=torch.randn(2, 16))
