"""Huge-page parameter storage: values, identity and tying kept; advisory only; no-op where unavailable."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor, nn

from moe_lab.nn import huge_pages
from moe_lab.nn.experts import Experts
from moe_lab.nn.huge_pages import HUGE_PAGE_BYTES, advise_huge_pages, huge_page_empty, huge_pages_available

needs_thp = pytest.mark.skipif(not huge_pages_available(), reason="transparent huge pages not available")
BIG = HUGE_PAGE_BYTES // 4  # float32 elements in one huge page


def test_huge_page_empty_shape_dtype() -> None:
    for shape, dtype in [((3, 4), torch.float32), ((2, BIG + 7), torch.float32), ((BIG,), torch.bfloat16)]:
        t = huge_page_empty(shape, dtype)
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
        t.fill_(1.5)
        assert bool((t == 1.5).all())


@needs_thp
def test_huge_page_empty_is_aligned_and_exact_size() -> None:
    t = huge_page_empty((3, BIG + 5), torch.float32)
    assert t.data_ptr() % HUGE_PAGE_BYTES == 0
    assert t.untyped_storage().nbytes() == t.numel() * 4  # no hidden padding in the storage


def test_advise_keeps_values_parameters_and_ties() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(1024, 600), nn.Linear(600, 1024, bias=False), nn.Linear(8, 8))
    model[1].weight = model[0].weight  # tied, 2.3 MiB
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    moved = advise_huge_pages(model)
    assert list(model.parameters()) == params  # same Parameter objects
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert model[1].weight is model[0].weight
    if huge_pages_available():
        assert moved == 1024 * 600 * 4  # the tied weight once; the small Linear stays
        assert model[0].weight.data_ptr() % HUGE_PAGE_BYTES == 0
        assert advise_huge_pages(model) == 0  # already moved
    else:
        assert moved == 0
    out = model[1](model[0](torch.tensor([1, 2])))
    out.sum().backward()  # autograd and gradients work on the new storage
    assert model[0].weight.grad is not None and model[0].weight.grad.shape == (1024, 600)


def test_advise_survives_copy_save_share() -> None:
    experts = Experts(8, 256, 512)  # 4 MiB per weight
    advise_huge_pages(experts)
    ref = experts.w1_EDF.detach().clone()
    clone = copy.deepcopy(experts)
    assert torch.equal(clone.w1_EDF, ref)
    buf = io.BytesIO()
    torch.save(experts.state_dict(), buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=True)["w1_EDF"], ref)
    experts.share_memory()
    assert experts.w1_EDF.is_shared() and torch.equal(experts.w1_EDF, ref)
    assert advise_huge_pages(experts) == 0  # shared memory is left alone
    experts.w1_EDF.data.add_(1.0)  # still writable
    assert torch.equal(experts.w1_EDF, ref + 1.0)


def test_unavailable_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huge_pages, "_available", False)
    lin = nn.Linear(1024, 1024)
    ptr = lin.weight.data_ptr()
    assert advise_huge_pages(lin) == 0 and lin.weight.data_ptr() == ptr
    t = huge_page_empty((BIG * 2,), torch.float32)
    assert t.shape == (BIG * 2,)


def test_skips_meta_and_noncontiguous() -> None:
    with torch.device("meta"):
        meta = nn.Linear(1024, 1024)
    assert advise_huge_pages(meta) == 0 and meta.weight.is_meta
    lin = nn.Linear(1024, 1024)
    lin.weight.data = lin.weight.data.t()  # non-contiguous: layout kept
    assert advise_huge_pages(lin) == 0 and not lin.weight.is_contiguous()


def test_environment_variable_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huge_pages, "_available", None)
    monkeypatch.setenv("MOE_LAB_HUGE_PAGES", "0")
    assert not huge_pages_available()
    lin = nn.Linear(1024, 1024)
    assert advise_huge_pages(lin) == 0


# ------------------------------------------------------------------------------------------ buffer pool
LARGE = huge_pages.EMPTY_LARGE_MIN_BYTES // 4  # float32 elements at the pool's threshold


@pytest.fixture
def fresh_pool(monkeypatch: pytest.MonkeyPatch) -> huge_pages._BufferPool:
    pool = huge_pages._BufferPool(256 << 20)
    monkeypatch.setattr(huge_pages, "_pool", pool)
    return pool


@needs_thp
def test_empty_large_reuses_a_freed_buffer_not_a_live_one(fresh_pool: huge_pages._BufferPool) -> None:
    like = torch.zeros(1)
    a = huge_pages.empty_large((2, LARGE), like)
    assert a.shape == (2, LARGE) and a.data_ptr() % HUGE_PAGE_BYTES == 0
    a_ptr = a.data_ptr()
    b = huge_pages.empty_large((2, LARGE), like)
    assert b.data_ptr() != a_ptr  # a is alive: its memory is not handed out again
    a.fill_(3.0)
    b.fill_(4.0)
    assert bool((a == 3.0).all()) and bool((b == 4.0).all())
    view = a[1]  # a view keeps the buffer in use after the tensor itself is gone
    del a
    c = huge_pages.empty_large((2, LARGE), like)
    assert c.data_ptr() != a_ptr
    del view, c
    d = huge_pages.empty_large((2, LARGE), like)
    assert d.data_ptr() == a_ptr  # free again: reused, no new mapping
    assert fresh_pool.stats()["buffers"] == 3


@needs_thp
def test_empty_large_best_fit_and_no_oversized_reuse(fresh_pool: huge_pages._BufferPool) -> None:
    like = torch.zeros(1, dtype=torch.bfloat16)
    big = huge_pages.empty_large((8 * LARGE,), like)  # 4x the threshold in bf16 elements -> 2x the bytes
    big_ptr = big.data_ptr()
    del big
    small = huge_pages.empty_large((LARGE // 2,), like)  # under the threshold in bytes: plain torch.empty
    assert small.data_ptr() != big_ptr
    quarter = huge_pages.empty_large((2 * LARGE,), like)  # a quarter of the free buffer: not worth it
    assert quarter.data_ptr() != big_ptr
    half = huge_pages.empty_large((4 * LARGE,), like)  # half: taken
    assert half.data_ptr() == big_ptr and half.dtype == torch.bfloat16


@needs_thp
def test_pool_limit_unmaps_free_buffers_and_release(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = huge_pages._BufferPool(8 * huge_pages.EMPTY_LARGE_MIN_BYTES)  # 8 units of free buffers at most
    monkeypatch.setattr(huge_pages, "_pool", pool)
    like = torch.zeros(1)
    bufs = [huge_pages.empty_large((LARGE * (i + 1),), like) for i in range(3)]  # 1, 2, 3 units, all live
    assert pool.stats()["buffers"] == 3 and pool.stats()["free_bytes"] == 0
    del bufs
    assert pool.stats()["free_buffers"] == 3
    x = huge_pages.empty_large((LARGE * 7,), like)  # 7 units fit none: the 3- and 2-unit ones go (cap 8)
    stats = pool.stats()
    assert stats["free_bytes"] == huge_pages.EMPTY_LARGE_MIN_BYTES and stats["buffers"] == 2
    over = huge_pages.empty_large(
        (LARGE * 9,), like
    )  # 144 MiB, over the cap: a plain tensor, nothing unmapped
    assert over.shape == (LARGE * 9,) and pool.stats() == stats
    assert huge_pages.release_buffers() == stats["free_bytes"]
    assert pool.stats() == {"buffers": 1, "bytes": x.numel() * 4, "free_buffers": 0, "free_bytes": 0}
    del x
    assert huge_pages.buffer_pool_stats()["free_buffers"] == 1


def test_pool_off_and_bad_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huge_pages, "_pool", None)
    monkeypatch.setenv("MOE_LAB_BUFFER_POOL_MB", "0")
    t = huge_pages.empty_large((2, LARGE), torch.zeros(1))
    assert t.shape == (2, LARGE) and huge_pages.buffer_pool_stats()["buffers"] == 0
    monkeypatch.setattr(huge_pages, "_pool", None)
    monkeypatch.setenv("MOE_LAB_BUFFER_POOL_MB", "lots")
    with pytest.raises(ValueError, match="MOE_LAB_BUFFER_POOL_MB"):
        huge_pages.buffer_pool_stats()


def test_pooled_buffers_in_autograd_match_plain_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Expert forward/backward through pooled buffers, twice (the second run reuses the first's memory),
    equals the same computation with the pool off."""
    torch.manual_seed(0)
    experts = Experts(4, 256, 1024)
    x = torch.randn(8192, 256)  # 8192 x 1024 hidden: 32 MiB buffers, from the pool
    counts = [1000, 3000, 192, 4000]

    def run() -> tuple[Tensor, Tensor]:
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = experts(xi, counts)
        (y * torch.arange(y.shape[1], dtype=y.dtype)).sum().backward()
        assert xi.grad is not None and experts.w1_EDF.grad is not None
        return y.detach().clone(), experts.w1_EDF.grad.clone()

    pooled = [run(), run()]
    monkeypatch.setattr(huge_pages, "_pool", huge_pages._BufferPool(0))
    plain = run()
    for y, g in pooled:
        torch.testing.assert_close(y, plain[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g, plain[1], rtol=1e-5, atol=1e-5)
