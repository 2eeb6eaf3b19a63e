"""Expert FFNs: grouped implementations vs a per-expert reference, dropout, init, shared experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _moe_reference import reference_ffn

from moe_lab.nn.experts import Experts, SharedExperts, grouped_matmul, has_grouped_mm

IMPLS = ["loop"] + (["grouped_mm"] if has_grouped_mm() else [])


def _reference(experts: Experts, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    outs = []
    for e, xe in enumerate(x.split(counts)):
        w3 = None if experts.w3_EDF is None else experts.w3_EDF[e]
        outs.append(reference_ffn(xe, experts.w1_EDF[e], w3, experts.w2_EFD[e]))
    return torch.cat(outs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 9, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
def test_grouped_matches_reference(impl: str, activation: str, counts: list[int]) -> None:
    torch.manual_seed(sum(counts))
    experts = Experts(4, 8, 12, activation=activation, init_std=0.3)
    x = torch.randn(sum(counts), 8, requires_grad=True)
    g = torch.randn(sum(counts), 8)
    got = experts(x, counts, impl=impl)
    (got * g).sum().backward()
    got_grads = [x.grad.clone()] + [p.grad.clone() for p in experts.parameters()]
    x.grad = None
    experts.zero_grad(set_to_none=False)
    ref = _reference(experts, x, counts)
    (ref * g).sum().backward()
    ref_grads = [x.grad] + [p.grad for p in experts.parameters()]
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_stride_gradient_is_accepted(impl: str) -> None:
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(2, 4, 4, requires_grad=True)
    offs = torch.tensor([2, 6], dtype=torch.int32)
    grouped_matmul(x, w, [2, 4], offs, impl).sum().backward()  # sum() gives an expanded (stride 0) grad
    torch.testing.assert_close(w.grad[0], x[:2].detach().sum(0)[:, None].expand(4, 4))


def test_auto_falls_back_to_loop_for_unaligned_sizes() -> None:
    torch.manual_seed(0)
    experts = Experts(3, 6, 10, init_std=0.3)  # 6 * 4 bytes is not a multiple of 16
    x = torch.randn(5, 6)
    torch.testing.assert_close(experts(x, [2, 0, 3]), _reference(experts, x, [2, 0, 3]))
    if has_grouped_mm():
        with pytest.raises(ValueError, match="16 bytes"):
            experts(x, [2, 0, 3], impl="grouped_mm")


def test_capacity_layout_equals_reference() -> None:
    torch.manual_seed(0)
    experts = Experts(3, 8, 12, init_std=0.3)
    x = torch.randn(3, 5, 8)
    got = experts.forward_capacity(x)
    ref = torch.stack([_reference(experts, x[e], [5 if i == e else 0 for i in range(3)]) for e in range(3)])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_expert_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    experts = Experts(2, 8, 16, expert_dropout=0.5)
    x = torch.randn(6, 8)
    experts.eval()
    a, b = experts(x, [3, 3]), experts(x, [3, 3])
    assert torch.equal(a, b)
    experts.train()
    c = experts(x, [3, 3])
    assert not torch.allclose(a, c)


def test_init_std_and_output_init_std() -> None:
    torch.manual_seed(0)
    experts = Experts(8, 64, 128, init_std=0.05, output_init_std=0.01)
    assert experts.w1_EDF.std().item() == pytest.approx(0.05, rel=0.05)
    assert experts.w3_EDF.std().item() == pytest.approx(0.05, rel=0.05)
    assert experts.w2_EFD.std().item() == pytest.approx(0.01, rel=0.05)
    assert experts.w1_EDF.shape == (8, 64, 128) and experts.w2_EFD.shape == (8, 128, 64)
    gelu = Experts(2, 4, 6, activation="gelu")
    assert gelu.w3_EDF is None and {n for n, _ in gelu.named_parameters()} == {"w1_EDF", "w2_EFD"}


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_shared_experts_is_a_wide_dense_ffn(activation: str) -> None:
    torch.manual_seed(0)
    shared = SharedExperts(8, 6, num_shared_experts=3, activation=activation)
    assert shared.w1.weight.shape == (18, 8)
    x = torch.randn(5, 8)
    if activation == "swiglu":
        ref = (F.silu(x @ shared.w1.weight.t()) * (x @ shared.w3.weight.t())) @ shared.w2.weight.t()
    else:
        ref = F.gelu(x @ shared.w1.weight.t()) @ shared.w2.weight.t()
    torch.testing.assert_close(shared(x), ref)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_experts": 0}, "num_experts"),
        ({"ffn_hidden_size": -1}, "ffn_hidden_size"),
        ({"activation": "relu"}, "activation"),
        ({"expert_dropout": 1.0}, "expert_dropout"),
        ({"init_std": 0.0}, "init_std"),
    ],
)
def test_bad_arguments(kwargs: dict, name: str) -> None:
    args = {"num_experts": 2, "hidden_size": 4, "ffn_hidden_size": 8} | kwargs
    n, d, f = args.pop("num_experts"), args.pop("hidden_size"), args.pop("ffn_hidden_size")
    with pytest.raises(ValueError, match=name):
        Experts(n, d, f, **args)


def test_bad_counts_and_impl() -> None:
    experts = Experts(2, 4, 8)
    with pytest.raises(ValueError, match="counts"):
        experts(torch.randn(3, 4), [1, 1])
    with pytest.raises(ValueError, match="impl"):
        experts(torch.randn(2, 4), [1, 1], impl="cuda")


@pytest.mark.parametrize(
    ("impl", "y"),
    # 3 fp32 columns break grouped_mm's 16-byte rule: "auto" must fall back to the loop there
    [("auto", 4), ("auto", 3), ("loop", 3)] + [(i, 4) for i in IMPLS],
)
def test_grouped_matmul_computes_offsets_and_resolves_auto(impl: str, y: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 4, requires_grad=True)
    w = torch.randn(3, 4, y, requires_grad=True)
    counts = [2, 0, 5]
    got = grouped_matmul(x, w, counts, None, impl)
    ref = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
    torch.testing.assert_close(got, ref)


@pytest.mark.skipif(not has_grouped_mm(), reason="needs torch._grouped_mm")
def test_large_weight_gradient_buffer_path() -> None:
    # a 16 MiB weight: its gradient buffer takes the huge-page-advised allocation path on Linux
    torch.manual_seed(0)
    x = torch.randn(6, 1024, requires_grad=True)
    w = torch.randn(4, 1024, 1024, requires_grad=True)
    counts = [3, 0, 2, 1]
    g = torch.randn(6, 1024)
    (grouped_matmul(x, w, counts, None, "grouped_mm") * g).sum().backward()
    ref = torch.zeros(4, 1024, 1024)
    for e, (xe, ge) in enumerate(zip(x.detach().split(counts), g.split(counts))):
        ref[e] = xe.t() @ ge
    torch.testing.assert_close(w.grad, ref)
