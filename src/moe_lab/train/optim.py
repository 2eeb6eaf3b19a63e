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

import torch
from torch import nn

from moe_lab.train.config import TrainConfig

__all__ = ["build_optimizer", "lr_factor", "param_groups", "set_lr"]


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


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (empty groups are left out); peak rates in ``base_lr``."""
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
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.betas, eps=cfg.eps)


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
