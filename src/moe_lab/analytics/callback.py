"""The trainer callback of the analytics package (registered as ``router_monitor``).

The implementation lives in :mod:`moe_lab.train.callbacks.router_monitor` (one callback per file); this
module is the name ``moe_lab.train.callbacks.registry`` points to.

Example:
    >>> from moe_lab.analytics.callback import RouterMonitorCallback
    >>> RouterMonitorCallback(co_selection_every=10).co_selection_every
    10
"""

from __future__ import annotations

from moe_lab.train.callbacks.router_monitor import RouterMonitorCallback

__all__ = ["RouterMonitorCallback"]
