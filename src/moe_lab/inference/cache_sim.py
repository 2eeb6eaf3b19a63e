"""Expert-cache simulator: replay a routing trace through eviction policies and compare hit rates.

Scopes:
    ``per_layer``  each MoE layer has its own cache of ``capacity`` experts (what a per-layer offloading
                   runtime does);
    ``global``     one cache of ``capacity * num_layers`` experts shared by all layers, keyed by
                   ``(layer, expert)``.

Requests are replayed token by token, layer by layer, slot by slot: the order an expert-offloading runtime
asks for experts while decoding. Before a token's requests at a layer the policy is told which experts that
token will ask for (``CachePolicy.begin``: the router has chosen them before any expert is loaded). Every
policy runs on the same request stream, so Belady's MIN is an upper bound of all of them (a property the
tests check).

Example:
    >>> import torch
    >>> from moe_lab.inference.trace import RoutingTrace
    >>> tr = RoutingTrace(torch.randint(0, 8, (200, 2, 2)), torch.rand(200, 2, 2), num_experts=8)
    >>> rows = compare_policies(tr, capacities=[4], policies=["lru", "belady"])
    >>> rows[0].policy, rows[0].capacity
    ('lru', 4)
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from moe_lab.inference.cache_policies import POLICIES, make_policy
from moe_lab.inference.trace import RoutingTrace

__all__ = ["SCOPES", "SimResult", "compare_policies", "format_table", "plot_results", "simulate"]

SCOPES = ("per_layer", "global")


@dataclass(frozen=True)
class SimResult:
    """Outcome of one (policy, capacity, scope) replay."""

    policy: str
    capacity: int
    scope: str
    requests: int
    hits: int
    layer_hit_rates: tuple[float, ...]

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def misses(self) -> int:
        return self.requests - self.hits

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        d["layer_hit_rates"] = list(self.layer_hit_rates)
        return d


Group = tuple[int, int, int]  # (start, stop, layer): one token's requests at one layer


def _streams(trace: RoutingTrace) -> tuple[list[list[int]], list[list[float]], list[list[Group]]]:
    """Per-layer request streams (expert ids and router weights, token order) and their token groups."""
    idx = trace.expert_indices.tolist()
    w = trace.weights.tolist()
    keys: list[list[int]] = [[] for _ in range(trace.num_layers)]
    weights: list[list[float]] = [[] for _ in range(trace.num_layers)]
    groups: list[list[Group]] = [[] for _ in range(trace.num_layers)]
    for tok_idx, tok_w in zip(idx, w):
        for layer, (slots, slot_w) in enumerate(zip(tok_idx, tok_w)):
            start = len(keys[layer])
            for e, ww in zip(slots, slot_w):
                if e >= 0:
                    keys[layer].append(e)
                    weights[layer].append(ww)
            if len(keys[layer]) > start:
                groups[layer].append((start, len(keys[layer]), layer))
    return keys, weights, groups


def _global_stream(trace: RoutingTrace) -> tuple[list[tuple[int, int]], list[float], list[Group]]:
    idx = trace.expert_indices.tolist()
    w = trace.weights.tolist()
    keys: list[tuple[int, int]] = []
    weights: list[float] = []
    groups: list[Group] = []
    for tok_idx, tok_w in zip(idx, w):
        for layer, (slots, slot_w) in enumerate(zip(tok_idx, tok_w)):
            start = len(keys)
            for e, ww in zip(slots, slot_w):
                if e >= 0:
                    keys.append((layer, e))
                    weights.append(ww)
            if len(keys) > start:
                groups.append((start, len(keys), layer))
    return keys, weights, groups


def _replay(
    name: str,
    capacity: int,
    keys: Sequence[Hashable],
    weights: Sequence[float],
    groups: Sequence[Group],
    profile: dict[Hashable, float] | None,
    decay: float,
) -> list[bool]:
    policy = make_policy(
        name, capacity, profile=profile, future=keys if name == "belady" else None, decay=decay
    )
    hits: list[bool] = []
    for start, stop, layer in groups:  # a token's experts are known (from its router) before any load
        policy.begin(keys[start:stop], layer)
        hits.extend(policy.access(keys[t], t, weights[t]) for t in range(start, stop))
    return hits


def simulate(
    trace: RoutingTrace,
    policy: str,
    capacity: int,
    *,
    scope: str = "per_layer",
    profile_trace: RoutingTrace | None = None,
    decay: float = 0.9,
) -> SimResult:
    """Replay ``trace`` through one policy. ``capacity`` is experts per layer (global: times layers).

    ``pin`` pins the most frequent experts of ``profile_trace`` (a calibration trace); without one, the
    trace itself is the profile (an offline static placement, reported as such by the CLI).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown eviction policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {', '.join(SCOPES)}")
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be a positive number of experts per layer, got {capacity!r}")
    freq = (profile_trace or trace).expert_frequencies().tolist()
    if scope == "per_layer":
        keys, weights, groups = _streams(trace)
        hits = 0
        total = 0
        layer_rates: list[float] = []
        for layer in range(trace.num_layers):
            profile: dict[Hashable, float] | None = (
                {e: float(c) for e, c in enumerate(freq[layer])} if policy == "pin" else None
            )
            res = _replay(policy, capacity, keys[layer], weights[layer], groups[layer], profile, decay)
            h = sum(res)
            hits += h
            total += len(res)
            layer_rates.append(h / len(res) if res else 0.0)
        return SimResult(policy, capacity, scope, total, hits, tuple(layer_rates))
    gkeys, gweights, ggroups = _global_stream(trace)
    gprofile: dict[Hashable, float] | None = None
    if policy == "pin":
        gprofile = {(layer, e): float(c) for layer, row in enumerate(freq) for e, c in enumerate(row)}
    res = _replay(policy, capacity * trace.num_layers, gkeys, gweights, ggroups, gprofile, decay)
    per_layer_hits = [0] * trace.num_layers
    per_layer_total = [0] * trace.num_layers
    for (layer, _), hit in zip(gkeys, res):
        per_layer_total[layer] += 1
        per_layer_hits[layer] += int(hit)
    rates = tuple(h / n if n else 0.0 for h, n in zip(per_layer_hits, per_layer_total))
    return SimResult(policy, capacity, scope, len(res), sum(res), rates)


def compare_policies(
    trace: RoutingTrace,
    capacities: Sequence[int],
    policies: Sequence[str] = POLICIES,
    scopes: Sequence[str] = ("per_layer",),
    *,
    profile_trace: RoutingTrace | None = None,
    decay: float = 0.9,
) -> list[SimResult]:
    """Every (scope, capacity, policy) combination, in that nesting order."""
    return [
        simulate(trace, p, c, scope=s, profile_trace=profile_trace, decay=decay)
        for s in scopes
        for c in capacities
        for p in policies
    ]


def format_table(results: Sequence[SimResult], offline: Sequence[str] = ("belady",)) -> str:
    """A markdown table: one row per (scope, capacity), one column per policy, plus best-online/Belady.

    ``offline``: policies left out of "best online" (Belady's MIN; ``pin`` too when its frequencies come from
    the replayed trace itself rather than a separate calibration trace)."""
    policies = list(dict.fromkeys(r.policy for r in results))
    groups: dict[tuple[str, int], dict[str, SimResult]] = {}
    for r in results:
        groups.setdefault((r.scope, r.capacity), {})[r.policy] = r
    head = ["scope", "capacity", *policies]
    has_belady = "belady" in policies and len(policies) > 1
    if has_belady:
        head.append("best online / belady")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (scope, cap), row in groups.items():
        cells = [scope, str(cap)] + [f"{row[p].hit_rate:.3f}" if p in row else "" for p in policies]
        if has_belady and "belady" in row:
            online = [r.hit_rate for p, r in row.items() if p not in offline]
            opt = row["belady"].hit_rate
            cells.append(f"{max(online) / opt:.3f}" if online and opt > 0 else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(
    results: Sequence[SimResult], path: str | Path, title: str = "Expert cache hit rate"
) -> Path:
    """Hit rate vs capacity, one line per policy (and scope), written as PNG with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in results:
        series.setdefault((r.scope, r.policy), []).append((r.capacity, r.hit_rate))
    for (scope, policy), pts in series.items():
        pts.sort()
        style = "--" if policy == "belady" else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{policy} ({scope})")
    ax.set_xlabel("capacity (experts per layer)")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
