"""Optimizer and learning-rate schedule: AdamW with three parameter groups, warm-up + decay.

Groups: ``decay`` (matrices, expert weights), ``no_decay`` (norms, biases, embeddings: no weight decay)
and ``router`` (router gates: own learning rate, no weight decay). Each group keeps its peak rate in
``group["base_lr"]``; :func:`set_lr` writes ``base_lr * lr_factor(step)`` into it before each step, so the
schedule needs no state beyond the step counter.

Example:
    >>> import torch
    >>> from moe_lab.train.config import TrainConfig
    >>> from moe_lab.train.optim import build_optimizer, lr_factor
    >>> opt = build_optimizer(torch.nn.Linear(4, 4), TrainConfig(learning_rate=1e-3))
    >>> [g["name"] for g in opt.param_groups]
    ['decay', 'no_decay']
    >>> round(lr_factor(0, TrainConfig(warmup_steps=10), total_steps=100), 3)
    0.1
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from moe_lab.train.config import TrainConfig

__all__ = ["adamw", "build_optimizer", "fused_supported", "lr_factor", "param_groups", "set_lr"]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split trainable parameters into ``decay``, ``no_decay`` and ``router`` (name, param) lists."""
    owner: dict[int, nn.Module] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owner.setdefault(id(p), mod)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"decay": [], "no_decay": [], "router": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        module = owner.get(id(p))
        parts = name.lower().split(".")
        if any(part.startswith("router") for part in parts):
            groups["router"].append((name, p))
        elif (
            p.ndim < 2
            or parts[-1].startswith("bias")
            or isinstance(module, nn.Embedding)
            or (module is not None and _is_norm(module))
            or any("embed" in part or "norm" in part for part in parts)
        ):
            groups["no_decay"].append((name, p))
        else:
            groups["decay"].append((name, p))
    return groups


_FUSED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` takes these parameters: plain tensors (not DTensors) of
    a floating dtype it supports, all on one CPU or CUDA device.

    >>> fused_supported([torch.zeros(2, requires_grad=True)])
    True
    """
    if not params:
        return False
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(type(p) in (torch.Tensor, nn.Parameter) and p.dtype in _FUSED_DTYPES for p in params)
    )


def adamw(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(groups, **kwargs)``, fused (one kernel over all parameters) where
    :func:`fused_supported`, else torch's default implementation.

    The fused kernel runs the same update; on CPU it is much faster than the default per-parameter loop
    (measured: 82 ms -> 9.5 ms per step for the 14.4M parameters of the ``small`` preset on 2 cores, about a
    fifth of its training step). Its results differ from the loop's by float rounding only (tested).

    >>> opt = adamw([{"params": [torch.zeros(2, requires_grad=True)]}], lr=1e-3)
    >>> opt.defaults["fused"]
    True
    """
    params = [p for g in groups for p in g["params"]]
    if "fused" not in kwargs and "foreach" not in kwargs and fused_supported(params):
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (:func:`adamw`: fused where supported) over :func:`param_groups` (empty groups are left out);
    peak rates in ``base_lr``."""
    router_lr = cfg.router_learning_rate if cfg.router_learning_rate is not None else cfg.learning_rate
    spec = {
        "decay": (cfg.learning_rate, cfg.weight_decay),
        "no_decay": (cfg.learning_rate, 0.0),
        "router": (router_lr, 0.0),
    }
    groups = []
    for gname, params in param_groups(model).items():
        if not params:
            continue
        lr, wd = spec[gname]
        groups.append(
            {"params": [p for _, p in params], "lr": lr, "base_lr": lr, "weight_decay": wd, "name": gname}
        )
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return adamw(groups, lr=cfg.learning_rate, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Multiplier of the peak rate for the optimizer step ``step`` (0-based) of ``total_steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    floor = cfg.min_lr_ratio
    if cfg.lr_schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Write the scheduled rate of every group for ``step``; returns the main (``decay``) group's rate."""
    factor = lr_factor(step, cfg, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return float(optimizer.param_groups[0]["lr"])
