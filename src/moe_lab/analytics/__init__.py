"""Routing analytics: statistics of routing decisions, a router monitor, specialisation analysis,
a cost model (FLOPs, parameters, memory, throughput), figure builders and self-contained reports.

Importing this package is cheap: plotly and matplotlib are imported only by the functions that draw.

Example:
    >>> from moe_lab.analytics import RouterMonitor
    >>> from moe_lab.models import MoEModel
    >>> import torch
    >>> model = MoEModel.from_preset("tiny")
    >>> monitor = RouterMonitor()
    >>> with monitor.track(model):
    ...     _ = model(torch.randint(0, model.config.vocab_size, (2, 16)))
    >>> stats = monitor.get_stats()
    >>> stats.layers[0].cv  # coefficient of variation of the expert loads  # doctest: +SKIP
"""

from __future__ import annotations

from moe_lab.analytics.analyzer import (
    CheckpointComparison,
    LayerRouting,
    RouterAnalyzer,
    SpecializationResult,
    compare_checkpoints,
    normalized_mutual_information,
)
from moe_lab.analytics.cost import (
    HARDWARE_PROFILES,
    CostSummary,
    DenseComparison,
    FlopBreakdown,
    HardwareProfile,
    MemoryEstimate,
    MoECostAnalyzer,
    ParamCounts,
    ThroughputEstimate,
    get_hardware_profile,
    measure_cpu_profile,
)
from moe_lab.analytics.flops import flop_counter, measure_forward_flops
from moe_lab.analytics.monitor import RouterMonitor, find_moe_layers
from moe_lab.analytics.plots import (
    co_selection_figure,
    cost_figure,
    drop_rate_figure,
    entropy_figure,
    eval_figure,
    expert_load_heatmap,
    figure_to_matplotlib,
    load_balance_figure,
    loss_figure,
    save_png,
    specialization_figure,
    table_figure,
)
from moe_lab.analytics.records import RunData, RunDirError, load_run, read_jsonl
from moe_lab.analytics.report import build_report, report_figures
from moe_lab.analytics.stats import (
    LayerStats,
    RouterStats,
    RoutingCounts,
    capacity_utilization,
    chosen_mask,
    co_selection_matrix,
    coefficient_of_variation,
    drop_rate,
    expert_counts,
    layer_stats,
    load_entropy,
    load_fractions,
    load_variance,
    max_mean_ratio,
    router_entropy,
    router_stats,
)
from moe_lab.analytics.visualizer import TrainingVisualizer

__all__ = [
    "HARDWARE_PROFILES",
    "CheckpointComparison",
    "CostSummary",
    "DenseComparison",
    "FlopBreakdown",
    "HardwareProfile",
    "LayerRouting",
    "LayerStats",
    "MemoryEstimate",
    "MoECostAnalyzer",
    "ParamCounts",
    "RouterAnalyzer",
    "RouterMonitor",
    "RouterStats",
    "RoutingCounts",
    "RunData",
    "RunDirError",
    "SpecializationResult",
    "ThroughputEstimate",
    "TrainingVisualizer",
    "build_report",
    "capacity_utilization",
    "chosen_mask",
    "co_selection_figure",
    "co_selection_matrix",
    "coefficient_of_variation",
    "compare_checkpoints",
    "cost_figure",
    "drop_rate",
    "drop_rate_figure",
    "entropy_figure",
    "eval_figure",
    "expert_counts",
    "expert_load_heatmap",
    "figure_to_matplotlib",
    "find_moe_layers",
    "flop_counter",
    "get_hardware_profile",
    "layer_stats",
    "load_balance_figure",
    "load_entropy",
    "load_fractions",
    "load_run",
    "load_variance",
    "loss_figure",
    "max_mean_ratio",
    "measure_cpu_profile",
    "measure_forward_flops",
    "normalized_mutual_information",
    "read_jsonl",
    "report_figures",
    "router_entropy",
    "router_stats",
    "save_png",
    "specialization_figure",
    "table_figure",
]
