"""Helpers shared by the exporters: the run's name / directory / config, scalar metrics, routing stats."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

__all__ = ["RunIdentity", "routing_layer_stats", "run_identity", "scalar_metrics"]

# keys of the trainer's metrics dict that are bookkeeping, not curves
_SKIP = {"step", "expert_load"}


class RunIdentity:
    """Name, directory and config dict of the run a trainer is doing."""

    def __init__(self, name: str, run_dir: Path | None, config: dict[str, Any] | None) -> None:
        self.name, self.run_dir, self.config = name, run_dir, config

    @property
    def runs_dir(self) -> Path | None:
        return self.run_dir.parent if self.run_dir is not None else None


def run_identity(trainer: Any) -> RunIdentity:
    """Read the run's identity from a :class:`moe_lab.train.MoETrainer` (duck-typed)."""
    rd = getattr(trainer, "run_dir", None)
    path = getattr(rd, "path", rd)
    run_dir = Path(path) if path is not None else None
    cfg = getattr(trainer, "config", None)
    name = (
        run_dir.name
        if run_dir is not None
        else (getattr(cfg, "name", None) or time.strftime("run-%Y%m%d-%H%M%S"))
    )
    config: dict[str, Any] | None = None
    run_config = getattr(trainer, "run_config", None)
    for source in (run_config, cfg):
        to_dict = getattr(source, "to_dict", None)
        if callable(to_dict):
            config = to_dict() if source is run_config else {"train": to_dict()}
            break
    return RunIdentity(str(name), run_dir, config)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric scalars of a metrics dict (no ``step``, no per-layer lists, no booleans)."""
    out = {}
    for k, v in metrics.items():
        if k in _SKIP or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


def routing_layer_stats(
    routing: list[Any],
) -> tuple[list[list[int]], list[list[float]], list[dict[str, float]]]:
    """Per MoE layer: token counts per expert, mean router probability per expert, and scalar statistics
    (router entropy, load variance, coefficient of variation, drop rate, ...) of a step's decisions."""
    from moe_lab.analytics.stats import layer_stats

    counts, probs, stats = [], [], []
    for i, d in enumerate(routing):
        ls = layer_stats(d, layer=i, with_co_selection=False)
        counts.append(list(ls.expert_counts))
        p_TE = d.router_probs.detach().float()
        if d.token_mask is not None:
            p_TE = p_TE[d.token_mask.reshape(-1).bool()]
        probs.append([float(x) for x in p_TE.mean(0).tolist()] if p_TE.shape[0] else [0.0] * ls.num_experts)
        stats.append(
            {
                "entropy": ls.entropy,
                "entropy_normalized": ls.entropy_normalized,
                "load_entropy_normalized": ls.load_entropy_normalized,
                "load_variance": ls.load_variance,
                "cv": ls.cv,
                "max_mean_ratio": ls.max_mean_ratio,
                "drop_rate": ls.drop_rate,
            }
        )
    return counts, probs, stats
