"""RouterMonitor: accumulate routing statistics of a model, by forward hooks or as a trainer callback.

Only counts are kept (a few ``[E]`` and ``[E, E]`` integer tensors per layer, see
:class:`~moe_lab.analytics.stats.RoutingCounts`), never activations or per-token tensors, so a monitor
can stay attached for a whole run.

Example:
    >>> import torch
    >>> from moe_lab.analytics import RouterMonitor
    >>> from moe_lab.models import MoEModel
    >>> model = MoEModel.from_preset("tiny")
    >>> monitor = RouterMonitor()
    >>> with monitor.track(model):
    ...     _ = model(torch.randint(0, model.config.vocab_size, (2, 16)))
    ...     _ = monitor.end_step(0)
    >>> stats = monitor.get_stats()          # totals since the last reset()
    >>> len(monitor.history)                 # one RouterStats per end_step()/on_routing()
    1
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_lab.analytics.stats import RouterStats, RoutingCounts
from moe_lab.nn.router import RoutingDecision

__all__ = ["LiveDashboard", "RouterMonitor", "find_moe_layers"]


def find_moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every MoE layer, in forward order.

    Uses ``model.moe_layers()`` when the model has it, else every module that is a
    :class:`moe_lab.nn.moe.MoELayer` (or, before that class exists, named ``MoELayer``).
    """
    names = {id(m): n for n, m in model.named_modules()}
    moe_layers = getattr(model, "moe_layers", None)
    if callable(moe_layers):
        layers = list(moe_layers())
        return [(names.get(id(m), f"moe{i}"), m) for i, m in enumerate(layers)]
    try:
        from moe_lab.nn.moe import MoELayer

        cls: type | None = MoELayer
    except ImportError:  # pragma: no cover - only before moe.py lands
        cls = None
    found = []
    for n, m in model.named_modules():
        if (cls is not None and isinstance(m, cls)) or type(m).__name__ == "MoELayer":
            found.append((n, m))
    return found


def _decision_in(output: Any) -> RoutingDecision | None:
    if isinstance(output, RoutingDecision):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, RoutingDecision):
                return item
    return (
        getattr(output, "routing", None)
        if isinstance(getattr(output, "routing", None), RoutingDecision)
        else None
    )


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed forward being recomputed)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return bool(task_id is not None and task_id() != -1)


class RouterMonitor:
    """Routing statistics over many batches and steps.

    Args:
        co_selection: also count the ``[E, E]`` co-selection matrix (one small matmul per layer and batch).
        max_history: keep at most this many per-step :class:`RouterStats` (oldest dropped); None keeps all.
        history_co_selection: keep the co-selection matrices in the history entries too (off by default:
            the totals always have them when ``co_selection`` is on).

    Two ways to feed it: ``with monitor.track(model): ...`` (forward hooks on the MoE layers; call
    :meth:`end_step` to close a step in the history), or ``trainer callbacks=[monitor.as_callback()]``
    (the trainer's ``on_routing`` feeds one step at a time). :meth:`observe` takes decisions directly.
    """

    def __init__(
        self,
        *,
        co_selection: bool = True,
        max_history: int | None = 10_000,
        history_co_selection: bool = False,
    ) -> None:
        self.co_selection = co_selection
        self.history_co_selection = history_co_selection
        self.history: deque[RouterStats] = deque(maxlen=max_history)
        self.names: list[str] = []
        self._total: list[RoutingCounts] = []
        self._pending: list[RoutingCounts] = []
        self._handles: list[Any] = []
        self._live_dir: Path | None = None

    # ------------------------------------------------------------------ feeding
    def _ensure(self, n_layers: int, experts: list[int]) -> None:
        if not self._total:
            self._total = [RoutingCounts(num_experts=e) for e in experts]
            self._pending = [RoutingCounts(num_experts=e) for e in experts]
            if len(self.names) != n_layers:
                self.names = [f"layer{i}" for i in range(n_layers)]
        elif len(self._total) != n_layers:
            raise ValueError(f"RouterMonitor saw {len(self._total)} MoE layers before, now {n_layers}")

    def _add(self, layer: int, decision: RoutingDecision) -> None:
        with torch.no_grad():
            counts = RoutingCounts(num_experts=decision.num_experts).add(
                decision, with_co_selection=self.co_selection
            )
        self._total[layer] = self._total[layer].merge(counts)
        if not self.history_co_selection:
            counts.co_selection = None
        self._pending[layer] = self._pending[layer].merge(counts)

    def observe(self, routing: list[RoutingDecision], step: int | None = None) -> None:
        """Add one forward pass' decisions (one per MoE layer); with ``step`` also close that step."""
        self._ensure(len(routing), [d.num_experts for d in routing])
        for i, d in enumerate(routing):
            self._add(i, d)
        if step is not None:
            self.end_step(step)

    def end_step(self, step: int) -> RouterStats | None:
        """Turn what was seen since the last call into one history entry; returns it (None if nothing)."""
        if not self._pending or self._pending[0].num_tokens == 0:
            return None
        entry = RouterStats(
            layers=[c.to_layer_stats(i, self.names[i]) for i, c in enumerate(self._pending)], step=step
        )
        self.history.append(entry)
        self._mirror(entry)
        self._pending = [RoutingCounts(num_experts=c.num_experts) for c in self._pending]
        return entry

    @contextlib.contextmanager
    def track(self, model: nn.Module) -> Iterator[RouterMonitor]:
        """Hook every MoE layer of ``model`` for the duration of the block."""
        layers = find_moe_layers(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no MoE layer to monitor")
        self.attach(model)
        try:
            yield self
        finally:
            self.detach()

    def attach(self, model: nn.Module) -> RouterMonitor:
        """Register forward hooks on the MoE layers (undo with :meth:`detach`)."""
        self.detach()
        layers = find_moe_layers(model)
        if not self._total:
            self.names = [n for n, _ in layers]
        for i, (_, module) in enumerate(layers):
            self._handles.append(module.register_forward_hook(self._make_hook(i, len(layers))))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, index: int, n_layers: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if _in_backward():  # activation checkpointing re-runs the forward: count it once
                return
            decision = _decision_in(output)
            if decision is None:
                return
            if not self._total:
                self._ensure(n_layers, [decision.num_experts] * n_layers)
            if self._total[index].num_experts != decision.num_experts:
                self._total[index] = RoutingCounts(num_experts=decision.num_experts)
                self._pending[index] = RoutingCounts(num_experts=decision.num_experts)
            self._add(index, decision)

        return hook

    def as_callback(self) -> Any:
        """A :class:`moe_lab.train.callbacks.base.Callback` that feeds this monitor from ``on_routing``."""
        from moe_lab.train.callbacks.base import Callback

        monitor = self

        class _MonitorCallback(Callback):
            def on_routing(self, trainer: Any, step: int, routing: list[Any]) -> None:
                monitor.observe(routing, step=step)

        return _MonitorCallback()

    # ------------------------------------------------------------------ reading
    def get_stats(self) -> RouterStats:
        """Totals over everything seen since construction or the last :meth:`reset`."""
        step = self.history[-1].step if self.history else None
        return RouterStats(
            layers=[c.to_layer_stats(i, self.names[i]) for i, c in enumerate(self._total)], step=step
        )

    def reset(self) -> None:
        """Forget totals, pending counts and history (hooks stay attached)."""
        self._total = []
        self._pending = []
        self.history.clear()

    def history_records(self) -> list[dict[str, Any]]:
        """The history as plain dicts (the ``routing.jsonl`` line format without co-selection)."""
        return [s.to_dict() for s in self.history]

    def _mirror(self, entry: RouterStats) -> None:
        """Append one history entry to the live run folder (``routing.jsonl`` + a ``metrics.jsonl`` line)."""
        if self._live_dir is None:
            return
        record = entry.to_dict()
        for layer in record["layers"]:
            if layer.get("co_selection") is None:
                layer.pop("co_selection", None)
        loads = [layer["load_fractions"] for layer in record["layers"]]
        with open(self._live_dir / "routing.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")
        with open(self._live_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": entry.step, "expert_load": loads}) + "\n")

    def start_dashboard(
        self,
        port: int = 8080,
        host: str = "127.0.0.1",
        *,
        runs_dir: str | os.PathLike[str] | None = None,
        run_name: str = "live-monitor",
        block: bool = False,
    ) -> LiveDashboard:
        """Serve the live dashboard (:mod:`moe_lab.dashboard`) for this monitor, bound to 127.0.0.1 by default.

        From now on every history entry (:meth:`end_step` / ``on_routing``) is also appended to
        ``<runs_dir>/<run_name>/routing.jsonl`` (and an ``expert_load`` line to ``metrics.jsonl``), which the
        dashboard imports as it grows. ``runs_dir`` defaults to a new temporary folder. The server runs in a
        daemon thread unless ``block``. Needs the ``serve`` extra (fastapi, uvicorn).
        """
        try:
            from moe_lab.dashboard import serve
        except ImportError as err:
            raise RuntimeError(
                f"the live dashboard needs moe_lab.dashboard and its dependencies (pip install 'moe-lab[serve]'): {err}"
            ) from err
        root = Path(runs_dir) if runs_dir is not None else Path(tempfile.mkdtemp(prefix="moe-lab-monitor-"))
        live = root / run_name
        live.mkdir(parents=True, exist_ok=True)
        self._live_dir = live
        for entry in self.history:  # what was seen before the dashboard started
            self._mirror(entry)
        url = f"http://{host}:{port}/"
        kwargs: dict[str, Any] = {"runs_dir": str(root), "host": host, "port": port}
        if block:
            serve(**kwargs)
            return LiveDashboard(url=url, run_dir=live, thread=None)
        thread = threading.Thread(target=serve, kwargs=kwargs, name="moe-lab-dashboard", daemon=True)
        thread.start()
        return LiveDashboard(url=url, run_dir=live, thread=thread)


@dataclass
class LiveDashboard:
    """What :meth:`RouterMonitor.start_dashboard` started: the page's URL, the mirrored run folder, the thread."""

    url: str
    run_dir: Path
    thread: threading.Thread | None
