"""Measure FLOPs of a real forward with ``torch.utils.flop_counter.FlopCounterMode``.

Out of the box (torch 2.13) ``FlopCounterMode`` counts ``mm/addmm/bmm/baddbmm`` and the CUDA SDPA kernels,
but *not* ``torch._grouped_mm`` (the default dropless expert path) nor the CPU flash-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``): both count 0. :func:`flop_counter` adds formulas for
them (same conventions: 2 FLOPs per multiply-add, full ``S x S`` attention), so the measured number covers
the fast paths too. With ``extra_formulas=False`` you get torch's own counter, which is exact on the
``impl="loop"`` expert path with the math SDPA backend.

Example:
    >>> import torch
    >>> from moe_lab.analytics.flops import measure_forward_flops
    >>> from moe_lab.models import MoEModel
    >>> model = MoEModel.from_preset("tiny")
    >>> flops, slots = measure_forward_flops(model, torch.randint(0, 256, (1, 16)))  # doctest: +SKIP
"""

from __future__ import annotations

from math import prod
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["extra_flop_formulas", "flop_counter", "measure_forward_flops"]

aten = torch.ops.aten


def _grouped_mm_flop(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``_grouped_mm``: 2D x 3D (rows grouped by offs), 3D x 3D (batched), 2D x 2D (K grouped), 3D x 2D."""
    a, b = tuple(a_shape), tuple(b_shape)
    if len(a) == 2 and len(b) == 3:  # [N, K] x [G, K, M]: every row meets one group's weight
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 3 and len(b) == 3:  # [G, N, K] x [G, K, M]
        return 2 * a[0] * a[1] * a[2] * b[2]
    if len(a) == 2 and len(b) == 2:  # [M, K] x [K, N] with K split into groups -> [G, M, N]
        return 2 * a[0] * a[1] * b[1]
    if len(a) == 3 and len(b) == 2:  # [G, M, K] x [N_total? , ...]: output-shaped fallback
        return 2 * prod(out_shape) * a[2] if out_shape is not None else 0
    return 0


def _cpu_flash_flop(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return int(sdpa_flop_count(q, k, v))


def _cpu_flash_bwd_flop(
    grad_out: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kw: Any
) -> int:
    return int(sdpa_backward_flop_count(grad_out, q, k, v))


def extra_flop_formulas() -> dict[Any, Any]:
    """Formulas for the ops torch's counter misses (only those this torch build has)."""
    table: dict[Any, Any] = {}
    for name, fn in (
        ("_grouped_mm", _grouped_mm_flop),
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_flop),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_bwd_flop),
    ):
        op = getattr(aten, name, None)
        if op is not None:
            table[op] = fn
    return table


def flop_counter(*, extra_formulas: bool = True, display: bool = False) -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts ``_grouped_mm`` and CPU flash attention (``extra_formulas``)."""
    return FlopCounterMode(display=display, custom_mapping=extra_flop_formulas() if extra_formulas else None)


def measure_forward_flops(
    model: torch.nn.Module, input_ids: torch.Tensor, *, extra_formulas: bool = True, **forward_kwargs: Any
) -> tuple[int, list[int]]:
    """``(measured forward FLOPs, computed expert slots per MoE layer)`` of ``model(input_ids)``.

    The slots (``slot_mask.sum()`` of each layer's decision) feed
    :meth:`moe_lab.analytics.cost.MoECostAnalyzer.forward_flops` for an exact comparison.
    """
    with torch.no_grad(), flop_counter(extra_formulas=extra_formulas) as counter:
        out = model(input_ids, **forward_kwargs)
    slots = [int(d.slot_mask.sum()) for d in getattr(out, "routing", [])]
    return int(counter.get_total_flops()), slots
