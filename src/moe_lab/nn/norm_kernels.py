"""Training kernels for RMSNorm and rotary embeddings: the same forward numbers as the plain tensor code in
:mod:`moe_lab.nn.transformer`, with hand-written backwards that take fewer passes over memory.

Autograd through ``weight * (x * rsqrt(mean(x^2) + eps))`` records six nodes and their temporaries; through
``x * cos + cat(-x2, x1) * sin`` it records a negation, a concatenation (whose backward zero-fills two
full-size buffers) and three products. The functions here save only their inputs (and the ``[..., 1]``
inverse RMS) and compute the gradients directly.

Shape legend: N any leading dims, D normalised dim; B batch, H heads, S sequence, Dh head dim.

Example:
    >>> x = torch.randn(3, 8, requires_grad=True)
    >>> w = torch.ones(8, requires_grad=True)
    >>> y = rms_norm_train(x, w, 1e-6)
    >>> bool(torch.equal(y, w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))))
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["rms_norm_train", "rotary_train"]


class _RMSNorm(torch.autograd.Function):
    """``weight * (x * rstd)``, ``rstd = rsqrt(mean(x^2) + eps)``; saves x, weight and rstd ``[N, 1]``."""

    @staticmethod
    def forward(ctx: Any, x_ND: Tensor, weight_D: Tensor, eps: float) -> Tensor:
        rstd_N1 = torch.rsqrt(x_ND.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x_ND, weight_D, rstd_N1)
        return weight_D * (x_ND * rstd_N1)

    @staticmethod
    def backward(ctx: Any, g_ND: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_ND, weight_D, rstd_N1 = ctx.saved_tensors
        xhat_ND = x_ND * rstd_N1
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # d/dx = rstd * (g*w - xhat * mean(g*w*xhat))
            gw_ND = g_ND * weight_D
            d = x_ND.shape[-1]
            dot_N1 = torch.linalg.vecdot(gw_ND, xhat_ND, dim=-1).unsqueeze(-1)
            grad_x = gw_ND.addcmul_(xhat_ND, dot_N1, value=-1.0 / d).mul_(rstd_N1)
        if ctx.needs_input_grad[1]:
            grad_w = xhat_ND.mul_(g_ND).reshape(-1, x_ND.shape[-1]).sum(0)
        return grad_x, grad_w, None


def rms_norm_train(x_ND: Tensor, weight_D: Tensor, eps: float) -> Tensor:
    """RMSNorm for float32 training: ``weight * (x * rsqrt(mean(x^2, -1) + eps))``.

    Forward bit-identical to that expression; the backward (float32) takes about half the passes of
    autograd's. Inputs of another dtype go through the plain expression (the float32 round trip of
    :class:`moe_lab.nn.transformer.RMSNorm` stays the caller's).
    """
    if x_ND.dtype != torch.float32 or weight_D.dtype != torch.float32:
        return weight_D * (x_ND * torch.rsqrt(x_ND.pow(2).mean(-1, keepdim=True) + eps))
    out: Tensor = _RMSNorm.apply(x_ND, weight_D, eps)
    return out


class _Rotary(torch.autograd.Function):
    """``x * cos + rotate_half(x) * sin`` without the concatenation; cos and sin take no gradient."""

    @staticmethod
    def forward(ctx: Any, x_BHSD: Tensor, cos_B1SD: Tensor, sin_B1SD: Tensor) -> Tensor:
        ctx.save_for_backward(cos_B1SD, sin_B1SD)
        half = x_BHSD.shape[-1] // 2
        out = x_BHSD * cos_B1SD
        # out1 = x1*c1 - x2*s1, out2 = x2*c2 + x1*s2: the cat form's products and sums, bit for bit
        # (a + (-b)*c == a - b*c exactly; no fused multiply-add, which would round differently)
        tmp = torch.mul(x_BHSD[..., half:], sin_B1SD[..., :half])
        out[..., :half].sub_(tmp)
        out[..., half:].add_(torch.mul(x_BHSD[..., :half], sin_B1SD[..., half:], out=tmp))
        return out

    @staticmethod
    def backward(ctx: Any, g_BHSD: Tensor) -> tuple[Tensor, None, None]:
        cos_B1SD, sin_B1SD = ctx.saved_tensors
        half = g_BHSD.shape[-1] // 2
        # dx1 = g1*c1 + g2*s2; dx2 = g2*c2 - g1*s1
        grad = g_BHSD * cos_B1SD
        grad[..., :half].addcmul_(g_BHSD[..., half:], sin_B1SD[..., half:])
        grad[..., half:].addcmul_(g_BHSD[..., :half], sin_B1SD[..., :half], value=-1.0)
        return grad, None, None


def rotary_train(x_BHSD: Tensor, cos_BSD: Tensor, sin_BSD: Tensor) -> Tensor:
    """:func:`moe_lab.nn.transformer.apply_rotary` with a direct backward (cos and sin without gradient).

    Example:
        >>> from moe_lab.nn.transformer import apply_rotary
        >>> x, ang = torch.randn(2, 3, 5, 8), torch.randn(2, 5, 8)
        >>> bool(torch.allclose(rotary_train(x, ang.cos(), ang.sin()), apply_rotary(x, ang.cos(), ang.sin())))
        True
    """
    out: Tensor = _Rotary.apply(x_BHSD, cos_BSD.unsqueeze(1), sin_BSD.unsqueeze(1))
    return out
