"""Slow, obvious references for the MoE fast paths (one python loop per slot / per expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_ffn(x_D: Tensor, w1_DF: Tensor, w3_DF: Tensor | None, w2_FD: Tensor) -> Tensor:
    """One expert on one (or a few) token(s)."""
    if w3_DF is not None:
        h = F.silu(x_D @ w1_DF) * (x_D @ w3_DF)
    else:
        h = F.gelu(x_D @ w1_DF)
    return h @ w2_FD


def reference_moe(
    x_TD: Tensor,
    idx_TK: Tensor,
    weights_TK: Tensor,
    mask_TK: Tensor,
    w1: Tensor,
    w3: Tensor | None,
    w2: Tensor,
    capacity: int | None = None,
) -> Tensor:
    """out[t] = sum over kept slots of w[t,k] * expert_{idx[t,k]}(x[t]); with ``capacity``, each expert
    keeps only its first ``capacity`` kept slots in token order (the capacity layout's rule)."""
    t_count, k_count = idx_TK.shape
    used = [0] * w1.shape[0]
    rows = []
    for t in range(t_count):
        acc = torch.zeros_like(x_TD[t])
        for k in range(k_count):
            if not bool(mask_TK[t, k]):
                continue
            e = int(idx_TK[t, k])
            used[e] += 1
            if capacity is not None and used[e] > capacity:
                continue
            w3e = None if w3 is None else w3[e]
            acc = acc + weights_TK[t, k].to(x_TD.dtype) * reference_ffn(x_TD[t], w1[e], w3e, w2[e])
        rows.append(acc)
    return torch.stack(rows)


def reference_keep(idx_TK: Tensor, chosen_TK: Tensor, capacity: int, num_experts: int) -> Tensor:
    """GShard priority: first choices of all tokens (token order), then second choices, ..."""
    t_count, k_count = idx_TK.shape
    kept = torch.zeros_like(chosen_TK)
    used = [0] * num_experts
    for k in range(k_count):
        for t in range(t_count):
            if bool(chosen_TK[t, k]):
                e = int(idx_TK[t, k])
                if used[e] < capacity:
                    kept[t, k] = True
                    used[e] += 1
    return kept
