"""Weight-only quantisation of stacked expert weights: int8 per output channel, int4 in groups.

Shape legend: E experts, I input dim of the projection, O output dim, G group size along I.
Stacked expert weights are stored ``[E, I, O]`` (``x_TI @ w_IO``), so a "channel" is one output column
of one expert: int8 keeps one fp32 scale per ``(e, o)``; int4 keeps one per ``(e, I/G group, o)``.
Quantisation is symmetric (zero point 0): ``w ~= q * scale``, int8 ``q`` in [-127, 127], int4 ``q`` in
[-7, 7], two int4 values packed per byte along I.

Example:
    >>> import torch
    >>> w = torch.randn(2, 64, 32)
    >>> q = quantize_weight(w, bits=8)
    >>> float((q.dequantize() - w).abs().max()) < float(w.abs().max()) / 100
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "QuantizedWeight",
    "dequantize_int4",
    "dequantize_int8",
    "quantize_int4",
    "quantize_int8",
    "quantize_weight",
]


def quantize_int8(w_EIO: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: returns ``(q_EIO int8, scale_E1O float32)``."""
    w = w_EIO.detach().float()
    scale = w.abs().amax(dim=-2, keepdim=True).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q_EIO: Tensor, scale_E1O: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_int8` (to ``dtype``)."""
    # one promoting multiply (int8 x float32 -> float32): the same values as q.float() * scale without the
    # float copy of q, which costs more than the multiply itself on CPU
    return torch.mul(q_EIO, scale_E1O.to(torch.float32)).to(dtype)


def quantize_int4(w_EIO: Tensor, group_size: int = 64) -> tuple[Tensor, Tensor]:
    """Grouped symmetric int4 along the input dim, packed two per byte.

    Returns ``(packed_E(I/2)O uint8, scale_E(I/G)O float32)``. ``I`` must be divisible by ``group_size``
    and ``group_size`` must be even.
    """
    e, i, o = w_EIO.shape
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even integer >= 2, got {group_size}")
    if i % group_size:
        raise ValueError(f"input dim {i} is not divisible by group_size {group_size}")
    w = w_EIO.detach().float().reshape(e, i // group_size, group_size, o)
    scale = w.abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / 7.0
    q = torch.round(w / scale).clamp_(-7, 7).to(torch.int16).reshape(e, i, o) + 8  # 1..15, stored unsigned
    packed = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).to(torch.uint8)
    return packed, scale.squeeze(2)


def dequantize_int4(
    packed_EHO: Tensor, scale_EGO: Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of :func:`quantize_int4`: unpack and scale back to ``[E, I, O]``."""
    p = packed_EHO.to(torch.int16)
    lo = (p & 0xF) - 8
    hi = ((p >> 4) & 0xF) - 8
    e, h, o = p.shape
    q = torch.stack((lo, hi), dim=2).reshape(e, (2 * h) // group_size, group_size, o)
    w = torch.mul(q, scale_EGO.unsqueeze(2).to(torch.float32))  # int16 x float32 -> float32, exact ints
    return w.reshape(e, 2 * h, o).to(dtype)


@dataclass
class QuantizedWeight:
    """A quantised stacked weight ``[E, I, O]`` that dequantises whole or one expert at a time."""

    data: Tensor
    scale: Tensor
    bits: int
    group_size: int | None
    shape: tuple[int, int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """All experts, ``[E, I, O]``."""
        if self.bits == 8:
            return dequantize_int8(self.data, self.scale, dtype)
        assert self.group_size is not None
        return dequantize_int4(self.data, self.scale, self.group_size, dtype)

    def dequantize_expert(self, e: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """One expert, ``[I, O]`` (touches only that expert's bytes)."""
        if self.bits == 8:
            return dequantize_int8(self.data[e : e + 1], self.scale[e : e + 1], dtype)[0]
        assert self.group_size is not None
        return dequantize_int4(self.data[e : e + 1], self.scale[e : e + 1], self.group_size, dtype)[0]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            self.data.to(device), self.scale.to(device), self.bits, self.group_size, self.shape
        )


def quantize_weight(w_EIO: Tensor, bits: int = 8, group_size: int | None = None) -> QuantizedWeight:
    """Quantise a stacked expert weight. ``bits`` 8 (per channel) or 4 (groups of ``group_size``, default 64
    or the input dim if smaller)."""
    if w_EIO.dim() != 3:
        raise ValueError(f"expected a stacked expert weight [E, I, O], got shape {tuple(w_EIO.shape)}")
    shape = (int(w_EIO.shape[0]), int(w_EIO.shape[1]), int(w_EIO.shape[2]))
    if bits == 8:
        q, s = quantize_int8(w_EIO)
        return QuantizedWeight(q, s, 8, None, shape)
    if bits == 4:
        g = group_size or min(64, shape[1])
        q, s = quantize_int4(w_EIO, g)
        return QuantizedWeight(q, s, 4, g, shape)
    raise ValueError(f"bits must be 8 or 4, got {bits}")
