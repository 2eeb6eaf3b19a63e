"""A bounded expert cache: experts live in a slow tier and a bounded number sit in compute-device memory.

Tiers:
    slow tier   ``"disk"``: one safetensors file per MoE layer, memory-mapped (``safe_open``), read per
                expert on a miss; ``"host"``: host memory (pinned when the device is CUDA).
    fast tier   tensors on the compute device (on CPU: ordinary memory), at most ``capacity`` experts
                per layer (``scope="per_layer"``) or ``capacity * num_layers`` in all (``scope="global"``).

Eviction uses the same policy objects as the simulator (:mod:`moe_lab.inference.cache_policies`), so a
replayed trace and a real run give the same hits and misses. An optional background prefetcher loads the
experts the *next* layer's router would pick for the current hidden state (speculative, as in
Mixtral-offloading); a prefetched expert saves the load time of a miss, and ``prefetch_accuracy`` reports
the share of prefetched experts that were used.

Example:
    >>> import torch
    >>> store = ExpertStore.from_tensors({0: {"w1": torch.randn(4, 8, 16), "w2": torch.randn(4, 16, 8)}})
    >>> cache = ExpertCache(store, capacity=2, policy="lru")
    >>> w = cache.get(0, 3)
    >>> cache.get_stats().misses
    1
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from moe_lab.inference.cache_policies import POLICIES, CachePolicy, make_policy

__all__ = ["CacheStats", "ExpertCache", "ExpertStore", "experts_in_budget"]

ExpertWeights = dict[str, Tensor]  # {"w1": [D, F], "w3": [D, F] (SwiGLU), "w2": [F, D]}


class ExpertStore:
    """The slow tier: every expert's weights, per layer, on disk (mmap) or in host memory."""

    def __init__(self, layers: dict[int, dict[str, Tensor]] | None, files: dict[int, Path] | None) -> None:
        self._host = layers
        self._files = files
        self._handles: dict[int, object] = {}
        self._lock = threading.Lock()
        src = layers if layers is not None else None
        if src is not None:
            self.layer_ids = sorted(src)
            first = src[self.layer_ids[0]]
            self.num_experts = int(next(iter(first.values())).shape[0])
            self.names = sorted(first)
        else:
            assert files is not None
            from safetensors import safe_open

            self.layer_ids = sorted(files)
            with safe_open(str(files[self.layer_ids[0]]), framework="pt") as fh:
                keys = list(fh.keys())
            self.names = sorted({k.split(".", 1)[1] for k in keys})
            self.num_experts = len({k.split(".", 1)[0] for k in keys})

    @classmethod
    def from_tensors(cls, layers: dict[int, dict[str, Tensor]], *, pin_memory: bool = False) -> ExpertStore:
        """Host-memory store from stacked weights ``{layer: {"w1": [E, D, F], ...}}`` (copied, detached)."""
        host: dict[int, dict[str, Tensor]] = {}
        for layer, ws in layers.items():
            host[layer] = {}
            for name, w in ws.items():
                t = w.detach().to("cpu", copy=True).contiguous()
                host[layer][name] = t.pin_memory() if pin_memory else t
        return cls(host, None)

    @classmethod
    def to_disk(cls, layers: dict[int, dict[str, Tensor]], directory: str | os.PathLike[str]) -> ExpertStore:
        """Write one safetensors file per layer (``e{j}.{name}`` per expert) and open it memory-mapped."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files: dict[int, Path] = {}
        for layer, ws in layers.items():
            tensors = {}
            for name, w in ws.items():
                for e in range(w.shape[0]):
                    tensors[f"e{e}.{name}"] = w[e].detach().to("cpu").contiguous()
            path = directory / f"experts-layer{layer:03d}.safetensors"
            fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
            os.close(fd)
            save_file(tensors, tmp)
            os.replace(tmp, path)
            files[layer] = path
        return cls(None, files)

    @property
    def on_disk(self) -> bool:
        return self._files is not None

    def load(self, layer: int, expert: int) -> ExpertWeights:
        """Read one expert's weights from the slow tier (a fresh CPU tensor per weight)."""
        if self._host is not None:
            return {name: w[expert] for name, w in self._host[layer].items()}
        assert self._files is not None
        from safetensors import safe_open

        with self._lock:
            fh = self._handles.get(layer)
            if fh is None:
                fh = safe_open(str(self._files[layer]), framework="pt")
                self._handles[layer] = fh
        return {name: fh.get_tensor(f"e{expert}.{name}") for name in self.names}  # type: ignore[attr-defined]

    def expert_nbytes(self, layer: int, expert: int) -> int:
        if self._host is not None:
            return sum(w[expert].numel() * w.element_size() for w in self._host[layer].values())
        return sum(t.numel() * t.element_size() for t in self.load(layer, expert).values())


@dataclass
class CacheStats:
    """Counters of an :class:`ExpertCache` since creation or the last ``reset_stats()``."""

    hits: int = 0
    misses: int = 0
    bytes_loaded: int = 0
    load_time_s: float = 0.0
    prefetched: int = 0
    prefetch_used: int = 0
    evictions: int = 0

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def mean_load_time_ms(self) -> float:
        loads = self.misses - self.prefetch_used
        return 1000.0 * self.load_time_s / loads if loads > 0 else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        return self.prefetch_used / self.prefetched if self.prefetched else 0.0

    def to_dict(self) -> dict[str, float]:
        d: dict[str, float] = {k: float(v) for k, v in asdict(self).items()}
        d.update(
            requests=float(self.requests),
            hit_rate=self.hit_rate,
            mean_load_time_ms=self.mean_load_time_ms,
            prefetch_accuracy=self.prefetch_accuracy,
        )
        return d


class ExpertCache:
    """Bounded cache of expert weights on ``device`` in front of an :class:`ExpertStore`.

    Args:
        store: the slow tier.
        capacity: experts per layer (``scope="per_layer"``) or per layer on average (``"global"``).
        policy: ``"lru"``, ``"lfu"``, ``"lfu_admit"``, ``"weighted_lru"``, ``"markov"`` or ``"pin"`` (online
            policies; a policy that bypasses a missed expert, as ``lfu_admit``, ``markov`` and ``pin`` do,
            serves it for the request without keeping it resident). ``markov`` learns from the expert sets
            announced with :meth:`begin` (the cached experts module calls it once per forward).
        scope: ``"per_layer"`` or ``"global"``.
        device: compute device (default: CPU).
        profile: ``[L, E]`` usage counts for ``pin`` (e.g. from a calibration trace).
        prefetch: start a background thread for :meth:`prefetch` requests.
    """

    @staticmethod
    def check_arguments(capacity: int | str, policy: str, scope: str, profile: Tensor | None) -> None:
        """Raise a ValueError for a bad policy, scope, capacity (a number of experts; a string is a byte
        budget, checked by :func:`experts_in_budget`) or a ``pin`` policy without a profile."""
        if policy not in POLICIES or policy == "belady":
            online = [p for p in POLICIES if p != "belady"]
            raise ValueError(
                f"eviction_policy must be one of {', '.join(online)} (belady is offline), got {policy!r}"
            )
        if scope not in ("per_layer", "global"):
            raise ValueError(f"scope must be 'per_layer' or 'global', got {scope!r}")
        if not isinstance(capacity, str) and (
            not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1
        ):
            raise ValueError(f"cache_size must be a positive number of experts, got {capacity!r}")
        if policy == "pin" and profile is None:
            raise ValueError("eviction_policy='pin' needs a usage profile (profile=[L, E] counts)")

    def __init__(
        self,
        store: ExpertStore,
        capacity: int,
        *,
        policy: str = "lru",
        scope: str = "per_layer",
        device: torch.device | str = "cpu",
        profile: Tensor | None = None,
        prefetch: bool = False,
        decay: float = 0.9,
    ) -> None:
        self.check_arguments(capacity, policy, scope, profile)
        if isinstance(capacity, str):
            raise ValueError(
                "ExpertCache capacity is a number of experts; turn a byte budget into one with "
                "experts_in_budget (enable_dynamic_loading does)"
            )
        if capacity > store.num_experts and scope == "per_layer":
            capacity = store.num_experts
        self.store = store
        self.capacity = capacity
        self.policy_name = policy
        self.scope = scope
        self.device = torch.device(device)
        self._lock = threading.RLock()
        self._resident: dict[Hashable, ExpertWeights] = {}
        self._policies: dict[int | None, CachePolicy] = {}
        layer_pos = {layer: i for i, layer in enumerate(store.layer_ids)}
        if scope == "per_layer":
            for layer in store.layer_ids:
                prof: dict[Hashable, float] | None = None
                if profile is not None:
                    prof = {e: float(c) for e, c in enumerate(profile[layer_pos[layer]].tolist())}
                self._policies[layer] = make_policy(policy, capacity, profile=prof, decay=decay)
        else:
            gprof: dict[Hashable, float] | None = None
            if profile is not None:
                gprof = {
                    (layer, e): float(c)
                    for layer in store.layer_ids
                    for e, c in enumerate(profile[layer_pos[layer]].tolist())
                }
            self._policies[None] = make_policy(
                policy, capacity * len(store.layer_ids), profile=gprof, decay=decay
            )
        self._t = 0
        self.stats = CacheStats()
        self._staged: dict[Hashable, Future[ExpertWeights]] = {}
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-prefetch") if prefetch else None
        )

    # ---------------------------------------------------------------------------------------------
    def _key(self, layer: int, expert: int) -> Hashable:
        return (layer, expert)

    def _policy(self, layer: int) -> CachePolicy:
        return self._policies[layer if self.scope == "per_layer" else None]

    def _policy_key(self, layer: int, expert: int) -> Hashable:
        return expert if self.scope == "per_layer" else (layer, expert)

    def _to_device(self, ws: ExpertWeights) -> ExpertWeights:
        non_blocking = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=non_blocking) for k, v in ws.items()}

    def _load(self, layer: int, expert: int) -> ExpertWeights:
        ws = self._to_device(self.store.load(layer, expert))
        if self.device.type == "cpu" and not self.store.on_disk:
            ws = {k: v.clone() for k, v in ws.items()}  # a real copy into the "device" tier
        return ws

    def begin(self, layer: int, experts: Iterable[int]) -> None:
        """Announce the experts one forward of ``layer`` is about to ask for (before its :meth:`get` calls)."""
        with self._lock:
            self._policy(layer).begin([self._policy_key(layer, int(e)) for e in experts], layer)

    def get(self, layer: int, expert: int, weight: float = 1.0) -> ExpertWeights:
        """The weights of one expert on the compute device (loading it on a miss)."""
        key = self._key(layer, expert)
        with self._lock:
            policy = self._policy(layer)
            pkey = self._policy_key(layer, expert)
            before = policy.resident
            hit = policy.access(pkey, self._t, weight)
            self._t += 1
            after = policy.resident
            if hit:
                self.stats.hits += 1
                return self._resident[key]
            self.stats.misses += 1
            staged = self._staged.pop(key, None)
        if staged is not None:
            ws = staged.result()
            with self._lock:
                self.stats.prefetch_used += 1
        else:
            t0 = time.perf_counter()
            ws = self._load(layer, expert)
            dt = time.perf_counter() - t0
            with self._lock:
                self.stats.load_time_s += dt
        with self._lock:
            self.stats.bytes_loaded += sum(t.numel() * t.element_size() for t in ws.values())
            for gone in before - after:
                gkey = self._key(layer, int(gone)) if self.scope == "per_layer" else gone  # type: ignore[call-overload]
                if self._resident.pop(gkey, None) is not None:  # type: ignore[arg-type]
                    self.stats.evictions += 1
            if pkey in after:
                self._resident[key] = ws
        return ws

    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        """Start loading experts of ``layer`` that are not resident (no-op without ``prefetch=True``)."""
        if self._executor is None:
            return
        with self._lock:
            for e in experts:
                key = self._key(layer, int(e))
                if key in self._resident or key in self._staged:
                    continue
                self._staged[key] = self._executor.submit(self._load, layer, int(e))
                self.stats.prefetched += 1
            # bound the staging area: drop the oldest speculative loads
            while len(self._staged) > 4 * max(1, self.capacity):
                self._staged.pop(next(iter(self._staged)))

    def resident_experts(self, layer: int) -> set[int]:
        with self._lock:
            keys: list[tuple[int, int]] = list(self._resident)  # type: ignore[arg-type]
            return {e for lay, e in keys if lay == layer}

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(t.numel() * t.element_size() for ws in self._resident.values() for t in ws.values())

    def get_stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return CacheStats(**asdict(self.stats))

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = CacheStats()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def experts_in_budget(budget: str, expert_nbytes: int, num_layers: int, scope: str = "per_layer") -> int:
    """How many experts per layer a byte ``budget`` (``"24MB"``, ``"1.5GiB"``) holds when one expert takes
    ``expert_nbytes``: per layer with ``scope="per_layer"``, shared by ``num_layers`` layers with ``"global"``
    (then per layer on average, as :class:`ExpertCache`'s ``capacity``). Every expert of a model has the
    same size.

    Example:
        >>> experts_in_budget("2KiB", expert_nbytes=1024, num_layers=4)
        2
        >>> experts_in_budget("2KiB", expert_nbytes=256, num_layers=4, scope="global")
        2
    """
    from moe_lab.interop.weights import parse_size

    nbytes = parse_size(budget, "cache_size")
    per_layer = nbytes if scope == "per_layer" else nbytes // max(num_layers, 1)
    if per_layer < expert_nbytes:
        where = "per layer" if scope == "per_layer" else f"for {num_layers} layers"
        raise ValueError(
            f"cache_size {budget!r} holds no expert {where} (one expert is {expert_nbytes:,} bytes)"
        )
    return per_layer // expert_nbytes
