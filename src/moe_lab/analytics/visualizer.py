"""TrainingVisualizer: the report's figures as matplotlib figures, for notebooks.

Every ``plot_*`` method takes a run directory, a :class:`~moe_lab.analytics.records.RunData`, a
:class:`~moe_lab.analytics.monitor.RouterMonitor`, a list of :class:`~moe_lab.analytics.stats.RouterStats`
or the plain records (``metrics.jsonl`` / ``routing.jsonl`` lines), and returns a ``matplotlib.figure.Figure``.

Example:
    >>> from moe_lab.analytics.visualizer import TrainingVisualizer
    >>> viz = TrainingVisualizer("runs/demo")  # doctest: +SKIP
    >>> fig = viz.plot_training_curves()  # doctest: +SKIP
    >>> fig.savefig("loss.png")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moe_lab.analytics import plots
from moe_lab.analytics.records import RunData, load_run, split_metrics
from moe_lab.analytics.stats import RouterStats

__all__ = ["TrainingVisualizer"]


class TrainingVisualizer:
    """Matplotlib figures of training curves and routing statistics.

    Args:
        source: default data for every method (run directory, RunData, RouterMonitor, records); optional.
    """

    def __init__(self, source: Any = None) -> None:
        self.source = source

    # ------------------------------------------------------------------ inputs
    def _src(self, source: Any) -> Any:
        src = self.source if source is None else source
        if src is None:
            raise ValueError("no data: pass a run directory, RunData, RouterMonitor or records")
        if isinstance(src, (str, os.PathLike)):
            return load_run(Path(src))
        return src

    def _metrics(self, source: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        src = self._src(source)
        if isinstance(src, RunData):
            return src.train, src.eval
        if isinstance(src, list) and all(isinstance(r, dict) for r in src):
            return split_metrics(src)
        raise ValueError(f"expected a run directory or metrics records, got {type(src).__name__}")

    def _routing(self, source: Any) -> list[dict[str, Any]]:
        src = self._src(source)
        if isinstance(src, RunData):
            return src.routing
        if hasattr(src, "history_records"):  # RouterMonitor
            return list(src.history_records())
        if isinstance(src, list):
            return [r.to_dict() if isinstance(r, RouterStats) else r for r in src]
        raise ValueError(
            f"expected a run directory, RouterMonitor or routing records, got {type(src).__name__}"
        )

    # ------------------------------------------------------------------ figures
    def plot_training_curves(self, source: Any = None) -> Any:
        """Loss (total, LM, aux, z) and eval loss against the step."""
        train, evals = self._metrics(source)
        return plots.figure_to_matplotlib(plots.loss_figure(train, evals))

    def plot_eval_curves(self, source: Any = None) -> Any:
        """Eval loss and perplexity."""
        return plots.figure_to_matplotlib(plots.eval_figure(self._metrics(source)[1]))

    def plot_expert_load(self, source: Any = None, layer: int = 0) -> Any:
        """Heatmap of the expert load fractions over steps for one layer."""
        src = self._src(source)
        train = src.train if isinstance(src, RunData) else None
        return plots.figure_to_matplotlib(plots.expert_load_heatmap(self._routing(src), layer, train=train))

    def plot_router_entropy(self, source: Any = None) -> Any:
        """Router entropy / log E per layer over steps."""
        return plots.figure_to_matplotlib(plots.entropy_figure(self._routing(source)))

    def plot_load_balance(self, source: Any = None) -> Any:
        """Coefficient of variation and variance of the expert loads per layer over steps."""
        return plots.figure_to_matplotlib(plots.load_balance_figure(self._routing(source)))

    def plot_drop_rate(self, source: Any = None) -> Any:
        """Token drop rate per layer over steps."""
        return plots.figure_to_matplotlib(plots.drop_rate_figure(self._routing(source)))

    def plot_co_selection(self, stats: RouterStats | list[list[int]], layer: int = 0) -> Any:
        """Co-selection heatmap from a RouterStats (with co-selection) or an ``[E, E]`` matrix."""
        matrix = stats.layers[layer].co_selection if isinstance(stats, RouterStats) else stats
        if matrix is None:
            raise ValueError(f"layer {layer} has no co-selection matrix (monitor with co_selection=True)")
        return plots.figure_to_matplotlib(plots.co_selection_figure(matrix, layer))

    def plot_specialization(self, result: Any, layer: int = 0) -> Any:
        """Label x expert share heatmap of a SpecializationResult."""
        return plots.figure_to_matplotlib(
            plots.specialization_figure(result.shares(layer), result.labels, layer, result.nmi[layer])
        )

    def plot_cost(self, summary: Any) -> Any:
        """Parameters and memory bars of a CostSummary (or its dict)."""
        data = summary.to_dict() if hasattr(summary, "to_dict") else summary
        return plots.figure_to_matplotlib(plots.cost_figure(data))
