"""Quantisation math against a plain element-by-element reference."""

from __future__ import annotations

import pytest
import torch

from moe_lab.inference.quant import dequantize_int4, quantize_int4, quantize_int8, quantize_weight


def _ref_int8(w):
    e, i, o = w.shape
    out = torch.empty_like(w)
    for ee in range(e):
        for oo in range(o):
            col = w[ee, :, oo]
            s = max(float(col.abs().max()), 1e-12) / 127.0
            out[ee, :, oo] = torch.tensor([max(-127, min(127, round(float(v) / s))) * s for v in col])
    return out


def _ref_int4(w, g):
    e, i, o = w.shape
    out = torch.empty_like(w)
    for ee in range(e):
        for oo in range(o):
            for start in range(0, i, g):
                blk = w[ee, start : start + g, oo]
                s = max(float(blk.abs().max()), 1e-12) / 7.0
                out[ee, start : start + g, oo] = torch.tensor(
                    [max(-7, min(7, round(float(v) / s))) * s for v in blk]
                )
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_matches_reference(seed):
    w = torch.randn(3, 16, 5, generator=torch.Generator().manual_seed(seed))
    q = quantize_weight(w, bits=8)
    torch.testing.assert_close(q.dequantize(), _ref_int8(w), rtol=0, atol=1e-6)
    assert q.data.dtype == torch.int8
    # error bound: half a quantisation step per channel
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((q.dequantize() - w).abs() <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("g", [2, 4, 8])
def test_int4_matches_reference_and_packs(g):
    w = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(g))
    q = quantize_weight(w, bits=4, group_size=g)
    assert q.data.dtype == torch.uint8
    assert q.data.shape == (2, 8, 3)  # two values per byte
    torch.testing.assert_close(q.dequantize(), _ref_int4(w, g), rtol=0, atol=1e-6)


def test_expert_slice_equals_full():
    w = torch.randn(4, 32, 8)
    for bits in (8, 4):
        q = quantize_weight(w, bits=bits, group_size=8)
        full = q.dequantize()
        for e in range(4):
            torch.testing.assert_close(q.dequantize_expert(e), full[e])


def test_int4_unpack_roundtrip_exact_on_grid():
    # values that lie exactly on the int4 grid survive unchanged
    scale = 0.5
    w = (torch.randint(-7, 8, (2, 8, 4)).float()) * scale
    w[:, :, :] = w.clamp(-3.5, 3.5)
    w[:, 0, :] = 3.5  # make every group's max exactly 7 steps
    w[:, 4, :] = 3.5
    packed, s = quantize_int4(w, 4)
    torch.testing.assert_close(dequantize_int4(packed, s, 4), w)


def test_errors():
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_weight(torch.randn(1, 4, 4), bits=3)
    with pytest.raises(ValueError, match="not divisible by group_size"):
        quantize_int4(torch.randn(1, 6, 4), 4)
    with pytest.raises(ValueError, match=r"\[E, I, O\]"):
        quantize_weight(torch.randn(4, 4))
    q, s = quantize_int8(torch.zeros(1, 4, 2))
    assert bool((q == 0).all())
