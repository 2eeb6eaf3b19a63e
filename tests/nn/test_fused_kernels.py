"""The hand-written autograd nodes of the training path, against plain torch on random inputs.

Each node is compared with the obvious composition of torch ops (outputs and every gradient), and
checked with ``torch.autograd.gradcheck`` in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_lab.nn.dispatch import _GatherRows, _WeightedScatterAdd
from moe_lab.nn.experts import _gmm, _GroupedMM, _SwiGLU
from moe_lab.nn.huge_pages import empty_large
from moe_lab.nn.losses import linear_cross_entropy


def test_swiglu_matches_silu_times_up_and_gradcheck() -> None:
    torch.manual_seed(0)
    h1 = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    h3 = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 5, dtype=torch.float64)
    out = _SwiGLU.apply(h1, h3)
    ref = F.silu(h1) * h3
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out, (h1, h3), g)
    want = torch.autograd.grad(ref, (h1, h3), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(_SwiGLU.apply, (h1, h3))


def test_gather_rows_matches_index_select() -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    token = torch.tensor([0, 5, 5, 2, 0, 3])
    torch.testing.assert_close(_GatherRows.apply(x, token), x.index_select(0, token))
    assert torch.autograd.gradcheck(lambda t: _GatherRows.apply(t, token), (x,))


def test_weighted_scatter_add_gradcheck() -> None:
    torch.manual_seed(2)
    y = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    token = torch.tensor([1, 1, 0, 3, 2])
    ref = torch.zeros(4, 3, dtype=torch.float64).index_add(0, token, y * w[:, None])
    torch.testing.assert_close(_WeightedScatterAdd.apply(y, w, token, 4), ref)
    assert torch.autograd.gradcheck(lambda a, b: _WeightedScatterAdd.apply(a, b, token, 4), (y, w))


@pytest.mark.parametrize("counts", [[3, 0, 2, 4], [0, 0, 9, 0], [0, 0, 0, 0]])
def test_gmm_blocks_match_per_expert_matmul(counts: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    import moe_lab.nn.experts as experts_module

    monkeypatch.setattr(experts_module, "_LARGE_BYTES", 0)  # every size takes the CPU block path
    torch.manual_seed(3)
    x = torch.randn(sum(counts), 8, dtype=torch.float64)
    w = torch.randn(4, 8, 6, dtype=torch.float64)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = _gmm(x, w, counts, offs)
    ref = torch.cat([xe @ w[e] for e, xe in enumerate(x.split(counts))])
    torch.testing.assert_close(out, ref)
    if sum(counts):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b: _GroupedMM.apply(a, b, counts, offs), (xr, wr))


def test_empty_large_gives_a_usable_buffer() -> None:
    like = torch.zeros(1)
    big = empty_large((5 << 20,), like)  # over the huge-page threshold: advised, still a normal tensor
    big.fill_(2.0)
    assert big.shape == (5 << 20,) and float(big.sum()) == 2.0 * (5 << 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_cross_entropy_matches_linear_plus_cross_entropy(dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    h = torch.randn(300, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(1000, 16, dtype=dtype, requires_grad=True)  # several row chunks of the loss
    target = torch.randint(0, 1000, (300,))
    target[::7] = -100
    logits, total = linear_cross_entropy(h, w, target)
    ref_logits = h @ w.T
    ref_total = F.cross_entropy(ref_logits.to(total.dtype), target, reduction="sum")
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-3)
    # a gradient reaching the logits too (e.g. a distillation term) is added to the loss gradient
    got = torch.autograd.grad(1.7 * total + 0.01 * (logits**2).sum(), (h, w))
    want = torch.autograd.grad(1.7 * ref_total + 0.01 * (ref_logits**2).sum(), (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_linear_cross_entropy_gradcheck_and_all_ignored() -> None:
    torch.manual_seed(5)
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, -100, 6, 0, 2])
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, target)[1], (h, w))
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, target)[0], (h, w))
    _, total = linear_cross_entropy(h, w, torch.full((5,), -100))
    assert float(total.detach()) == 0.0


def test_gmm_small_outputs_use_grouped_mm_and_agree() -> None:
    """Below the huge-page size, _gmm is torch._grouped_mm itself; same numbers as the block loop."""
    torch.manual_seed(4)
    counts = [5, 0, 7, 4]
    x, w = torch.randn(16, 16), torch.randn(4, 16, 32)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    ref = torch.cat([xe @ w[e] for e, xe in enumerate(x.split(counts))])
    torch.testing.assert_close(_gmm(x, w, counts, offs), ref)


def test_linear_cross_entropy_retained_graph_and_no_grad() -> None:
    """The first backward reuses the forward's exponentials in place; a second one recomputes them."""
    torch.manual_seed(6)
    h = torch.randn(40, 8, requires_grad=True)
    w = torch.randn(300, 8, requires_grad=True)
    target = torch.randint(0, 300, (40,))
    _, total = linear_cross_entropy(h, w, target)
    first = torch.autograd.grad(total, (h, w), retain_graph=True)
    second = torch.autograd.grad(total, (h, w))
    ref_total = F.cross_entropy(h @ w.T, target, reduction="sum")
    want = torch.autograd.grad(ref_total, (h, w))
    for a, b, r in zip(first, second, want):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b, r, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        _, total_ng = linear_cross_entropy(h, w, target)
    assert torch.equal(total_ng, total.detach())
