"""RMSNorm and rotary training kernels against the plain autograd expressions (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch

from moe_lab.nn.norm_kernels import _RMSNorm, _Rotary, rms_norm_train, rotary_train
from moe_lab.nn.transformer import Attention, RMSNorm, RotaryEmbedding, apply_rotary


def _ref_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 3, 8), (3, 1, 32)])
def test_rms_norm_matches_autograd(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).requires_grad_()
    w = torch.randn(shape[-1], generator=g).requires_grad_()
    gy = torch.randn(shape, generator=g)
    y = rms_norm_train(x, w, 1e-5)
    (gx, gw) = torch.autograd.grad(y, (x, w), gy)
    y_ref = _ref_rms(x, w, 1e-5)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), gy)
    assert torch.equal(y, y_ref)  # forward bit-identical
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)


def test_rms_norm_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-6), (x, w))


def test_rms_norm_partial_grads_and_other_dtypes() -> None:
    x = torch.randn(4, 8)
    w = torch.randn(8, requires_grad=True)
    (gw,) = torch.autograd.grad(rms_norm_train(x, w, 1e-6).sum(), (w,))
    (gw_ref,) = torch.autograd.grad(_ref_rms(x, w, 1e-6).sum(), (w,))
    torch.testing.assert_close(gw, gw_ref)
    xb = torch.randn(4, 8, dtype=torch.bfloat16)
    assert rms_norm_train(xb, w, 1e-6).dtype == torch.float32  # plain expression: w (float32) promotes


def test_rmsnorm_module_training_equals_eval_numbers() -> None:
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 16, requires_grad=True)
    y_train = norm(x)
    with torch.no_grad():
        y_eval = norm(x)
    assert y_train.grad_fn is not None and torch.equal(y_train, y_eval)


def _angles(b: int, s: int, dh: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(s)[None].expand(b, s)
    return RotaryEmbedding(dh)(pos, torch.float32)


def test_rotary_matches_autograd_bitwise_forward() -> None:
    g = torch.Generator().manual_seed(2)
    b, s, h, dh = 2, 7, 3, 8
    cos, sin = _angles(b, s, dh)
    x = torch.randn(b, s, h, dh, generator=g).transpose(1, 2).requires_grad_()  # projection layout
    gy = torch.randn(b, h, s, dh, generator=g)
    y = rotary_train(x, cos, sin)
    y_ref = apply_rotary(x, cos, sin)
    assert torch.equal(y, y_ref)
    (gx,) = torch.autograd.grad(y, (x,), gy)
    (gx_ref,) = torch.autograd.grad(y_ref, (x,), gy)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)


def test_rotary_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ang = torch.randn(2, 1, 3, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: _Rotary.apply(a, ang.cos(), ang.sin()), (x,))


@pytest.mark.parametrize("qk_norm", ["none", "full", "per_head"])
def test_attention_training_grads_match_plain_path(qk_norm: str) -> None:
    """Attention with the kernels (grad enabled) against the same module with the plain expressions."""
    torch.manual_seed(4)
    attn = Attention(32, num_heads=4, num_kv_heads=2, qk_norm=qk_norm)
    cos, sin = _angles(2, 5, 8)
    x = torch.randn(2, 5, 32, requires_grad=True)
    y = attn(x, cos, sin)
    grads = torch.autograd.grad(y.square().sum(), (x, *attn.parameters()))
    # the plain path: angles that require grad make the attention fall back to apply_rotary; the
    # reference norms are the eval expression
    cos_r, sin_r = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    import moe_lab.nn.transformer as tr

    orig = tr.rms_norm_train
    tr.rms_norm_train = _ref_rms  # type: ignore[assignment]
    try:
        y_ref = attn(x, cos_r, sin_r)
    finally:
        tr.rms_norm_train = orig
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (x, *attn.parameters()))
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
