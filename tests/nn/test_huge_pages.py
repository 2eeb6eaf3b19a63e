"""Huge-page parameter storage: values, identity and tying kept; advisory only; no-op where unavailable."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

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
