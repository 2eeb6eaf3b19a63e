"""Eviction policies for a bounded expert cache, shared by the simulator and the runtime cache.

Each policy manages a set of resident keys (an expert id, or a ``(layer, expert)`` pair for a global cache)
of at most ``capacity`` entries. The protocol, called once per request in request order:

- ``access(key, t, weight)`` returns True on a hit. On a miss the expert is loaded for this request (it is
  always computed), and the policy decides whether to keep it resident, evicting a victim when full.
- ``resident`` is the current set of resident keys.
- ``begin(keys, group)`` (optional, before a group's requests): the keys one token asks for at one layer (what
  its router chose, known before any expert is loaded), and the group (the layer) they belong to. Until the
  next ``begin``, no policy but plain ``lfu`` evicts one of these keys: the token needs all of them at once,
  and evicting one it has not asked for yet would only turn that request into a miss (when every resident is
  one of them, a missed expert is served and not kept). ``markov`` also learns from them. Without ``begin``
  (requests one at a time) nothing is protected.

Policies:
    ``lru``           evict the least recently used expert.
    ``lfu``           evict the least frequently used expert (counts since the start; ties -> least recent).
    ``lfu_admit``     LFU with a TinyLFU-style admission rule: on a miss with a full cache, the new expert
                      is kept only if its count (this request included) beats the LFU victim's; otherwise
                      it is used for its request and not kept (bypass, as Belady may do). Rare experts no
                      longer churn the one slot that plain LFU recycles, and the cache converges on the
                      most used experts of the stream seen so far.
    ``weighted_lru``  evict the expert with the smallest exponentially decayed sum of router weights
                      (recency x frequency x how much the router relied on it; ``decay`` per request step).
    ``markov``        keep the experts most likely to be used by the *next* token: a first-order Markov model
                      of the routing, learned online (for each expert i, how often each expert j is used by
                      the token after one that used i), scores every candidate from the current token's
                      experts; a missed expert replaces the lowest-scored resident only if it scores higher,
                      else it is bypassed. Needs ``begin`` (the simulator and the runtime cache call it).
    ``pin``           keep a fixed set of the most frequent experts of a usage profile; others are loaded
                      for their request only and never kept (no churn).
    ``belady``        Belady's offline optimum (MIN) with bypass: needs the future; on a miss, evicts the
                      resident (or skips keeping the new expert) whose next use is farthest away. It is an
                      upper bound of the hit rate of every policy above on the same request stream.

Example:
    >>> p = make_policy("lru", capacity=2)
    >>> [p.access(k, t) for t, k in enumerate([1, 2, 1, 3, 2])]
    [False, False, True, False, False]
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Sequence

__all__ = [
    "POLICIES",
    "BeladyPolicy",
    "CachePolicy",
    "LFUAdmitPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "MarkovPolicy",
    "PinPolicy",
    "WeightedLRUPolicy",
    "make_policy",
]

Key = Hashable


class CachePolicy:
    """Base class: a bounded set of resident keys with a replacement rule."""

    name = "base"
    protects_current = True
    """Whether the keys announced by :meth:`begin` are kept from eviction until the next ``begin``."""
    _current: frozenset[Key] = frozenset()  # the keys announced by the last begin()

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer number of experts, got {capacity!r}")
        self.capacity = capacity

    @property
    def resident(self) -> set[Key]:  # pragma: no cover - overridden
        raise NotImplementedError

    def access(self, key: Key, t: int, weight: float = 1.0) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def evict_candidate(self) -> Key | None:
        """The key the policy would evict next (None when not full). Used by the runtime cache."""
        return None

    def begin(self, keys: Sequence[Key], group: Hashable = None) -> None:
        """Announce the keys of the next requests (one token at one layer): none of them is evicted until the
        next ``begin``."""
        self._current = frozenset(keys)

    def _evictable(self, resident: Iterable[Key]) -> Iterator[Key]:
        """The resident keys the current token does not use, lazily, in ``resident``'s order (all of them when
        the policy does not protect the current token's keys)."""
        if not self.protects_current:
            return iter(resident)
        return (k for k in resident if k not in self._current)


class LRUPolicy(CachePolicy):
    """Least recently used."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[Key, None] = OrderedDict()

    @property
    def resident(self) -> set[Key]:
        return set(self._order)

    def _victim(self) -> Key | None:
        return next(self._evictable(self._order), None)

    def access(self, key: Key, t: int, weight: float = 1.0) -> bool:
        if key in self._order:
            self._order.move_to_end(key)
            return True
        if len(self._order) >= self.capacity:
            victim = self._victim()
            if victim is None:
                return False  # every resident is needed by this token: served, not kept
            del self._order[victim]
        self._order[key] = None
        return False

    def evict_candidate(self) -> Key | None:
        return self._victim() if len(self._order) >= self.capacity else None


class LFUPolicy(CachePolicy):
    """Least frequently used (frequency counted since the start, ties broken by recency).

    Textbook LFU always admits a missed expert, so it does not protect the current token's experts: kept from
    evicting a rare one the token still needs, it would evict a frequent one for the newcomer instead (hit
    rate 0.455 -> 0.413 on a 64-expert trace). :class:`LFUAdmitPolicy`, which can bypass, protects them.
    """

    name = "lfu"
    protects_current = False

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._freq: dict[Key, int] = {}
        self._last: dict[Key, int] = {}
        self._resident: set[Key] = set()

    @property
    def resident(self) -> set[Key]:
        return set(self._resident)

    def _victim(self) -> Key | None:
        return min(
            self._evictable(self._resident), key=lambda k: (self._freq[k], self._last[k]), default=None
        )

    def _admit(self, key: Key, victim: Key) -> bool:
        """Whether a missed ``key`` may replace ``victim`` in a full cache (LFU: always)."""
        return True

    def access(self, key: Key, t: int, weight: float = 1.0) -> bool:
        self._freq[key] = self._freq.get(key, 0) + 1
        self._last[key] = t
        if key in self._resident:
            return True
        if len(self._resident) >= self.capacity:
            victim = self._victim()
            if victim is None or not self._admit(key, victim):
                return False  # bypass: served for this request, not kept
            self._resident.discard(victim)
        self._resident.add(key)
        return False

    def evict_candidate(self) -> Key | None:
        return self._victim() if len(self._resident) >= self.capacity else None


class LFUAdmitPolicy(LFUPolicy):
    """LFU with frequency-based admission: a missed expert replaces the LFU victim only if used more often.

    Example:
        >>> p = LFUAdmitPolicy(1)
        >>> [p.access(k, t) for t, k in enumerate([1, 2, 2, 1])]  # 2 is admitted on its 2nd use only
        [False, False, False, False]
        >>> p.resident
        {2}
    """

    name = "lfu_admit"
    protects_current = True

    def _admit(self, key: Key, victim: Key) -> bool:
        return self._freq[key] > self._freq[victim]  # else bypass: not used more often than the victim


class WeightedLRUPolicy(CachePolicy):
    """Evict the smallest exponentially decayed sum of router weights (recency and importance)."""

    name = "weighted_lru"

    def __init__(self, capacity: int, decay: float = 0.9) -> None:
        super().__init__(capacity)
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay!r}")
        self.decay = decay
        self._log_decay = math.log(decay)
        # score is stored as (value, time it refers to); value at t' is value * decay**(t' - time)
        self._score: dict[Key, tuple[float, int]] = {}
        self._resident: set[Key] = set()

    @property
    def resident(self) -> set[Key]:
        return set(self._resident)

    def _value(self, key: Key, t: int) -> float:
        value, at = self._score.get(key, (0.0, t))
        return value * math.exp(self._log_decay * (t - at)) if value else 0.0

    def _victim(self, t: int) -> Key | None:
        return min(self._evictable(self._resident), key=lambda k: self._value(k, t), default=None)

    def access(self, key: Key, t: int, weight: float = 1.0) -> bool:
        self._score[key] = (self._value(key, t) + max(float(weight), 1e-6), t)
        if key in self._resident:
            return True
        if len(self._resident) >= self.capacity:
            victim = self._victim(t)
            if victim is None:
                return False  # every resident is needed by this token: served, not kept
            self._resident.discard(victim)
        self._resident.add(key)
        return False

    def evict_candidate(self) -> Key | None:
        if len(self._resident) < self.capacity:
            return None
        t = max((at for _, at in self._score.values()), default=0)
        return self._victim(t)


class MarkovPolicy(CachePolicy):
    """Keep the experts the next token is most likely to use, predicted from the current token's experts.

    A first-order Markov model of the routing, learned online from the groups announced with :meth:`begin`
    (one token at one layer): ``pairs[i][j]`` counts the tokens that used expert ``j`` right after a token of
    the same group that used ``i``; ``uses[i]`` counts the tokens that used ``i`` and had a successor. Given
    the current token's experts ``S``, a candidate ``j`` (resident, or loaded for this token) scores

        ``sum over i in S of (pairs[i][j] + a * f_j) / (uses[i] + a)``

    (the expected number of ``S``'s experts after which ``j`` comes next), where ``f_j`` is the share of the
    group's tokens that used ``j`` (the prior for rarely seen ``i``) and ``a = smoothing``. A missed expert
    replaces the lowest-scored resident only if it scores higher; otherwise it is served for its request and
    not kept (bypass). As with every policy, the experts of the token being served are never the victim. With
    a global cache the keys of other groups keep the score of their group's last token.
    Without :meth:`begin` nothing is ever scored and a full cache keeps its first experts.

    Example:
        >>> p = MarkovPolicy(capacity=1)
        >>> hits = []
        >>> for t, token_experts in enumerate([[1], [2], [1], [2], [1]]):  # 1 and 2 alternate
        ...     p.begin(token_experts)
        ...     hits.append(p.access(token_experts[0], t))
        >>> hits  # LRU with one slot never hits here; this keeps 1 while 2 is bypassed
        [False, False, True, False, True]
    """

    name = "markov"

    def __init__(self, capacity: int, smoothing: float = 1.0) -> None:
        super().__init__(capacity)
        if not smoothing > 0:
            raise ValueError(f"smoothing must be positive, got {smoothing!r}")
        self.smoothing = float(smoothing)
        self._pairs: dict[Key, dict[Key, int]] = {}
        self._uses: dict[Key, int] = {}
        self._freq: dict[Key, int] = {}
        self._tokens: dict[Hashable, int] = {}
        self._prev: dict[Hashable, tuple[Key, ...]] = {}
        self._group: dict[Key, Hashable] = {}
        self._score: dict[Key, float] = {}
        self._resident: set[Key] = set()

    @property
    def resident(self) -> set[Key]:
        return set(self._resident)

    def begin(self, keys: Sequence[Key], group: Hashable = None) -> None:
        super().begin(keys, group)
        cur = tuple(dict.fromkeys(keys))
        if not cur:
            return
        prev = self._prev.get(group)
        if prev is not None:  # learn: every expert of the previous token was followed by cur
            for i in prev:
                self._uses[i] = self._uses.get(i, 0) + 1
                row = self._pairs.setdefault(i, {})
                for j in cur:
                    row[j] = row.get(j, 0) + 1
        self._prev[group] = cur
        tokens = self._tokens[group] = self._tokens.get(group, 0) + 1
        for j in cur:
            self._freq[j] = self._freq.get(j, 0) + 1
            self._group[j] = group
        a = self.smoothing
        rows = [(self._pairs.get(i, {}), self._uses.get(i, 0) + a) for i in cur]
        for j in {*cur, *(k for k in self._resident if self._group.get(k) == group)}:
            prior = a * self._freq.get(j, 0) / tokens
            self._score[j] = sum((row.get(j, 0) + prior) / n for row, n in rows)

    def _rank(self, key: Key) -> tuple[float, int]:
        return self._score.get(key, 0.0), self._freq.get(key, 0)

    def _victim(self) -> Key | None:
        """The lowest-scored resident the current token does not use (None if it uses them all)."""
        return min(self._evictable(self._resident), key=self._rank, default=None)

    def access(self, key: Key, t: int, weight: float = 1.0) -> bool:
        if key in self._resident:
            return True
        if len(self._resident) < self.capacity:
            self._resident.add(key)
            return False
        victim = self._victim()
        if victim is not None and self._rank(key) > self._rank(victim):
            self._resident.discard(victim)
            self._resident.add(key)
        return False  # else bypass: less likely to be used next than every resident it could replace

    def evict_candidate(self) -> Key | None:
        return self._victim() if len(self._resident) >= self.capacity else None


class PinPolicy(CachePolicy):
    """Keep the ``capacity`` most frequent experts of a usage profile; load others for one request only."""

    name = "pin"

    def __init__(self, capacity: int, profile: dict[Key, float] | None = None) -> None:
        super().__init__(capacity)
        self._pinned: set[Key] = set()
        self._resident: set[Key] = set()
        if profile is not None:
            self.set_profile(profile)

    def set_profile(self, profile: dict[Key, float]) -> None:
        """Choose the pinned set: the ``capacity`` keys with the highest usage (ties by key order)."""
        ranked = sorted(profile.items(), key=lambda kv: (-kv[1], str(kv[0])))
        self._pinned = {k for k, _ in ranked[: self.capacity]}

    @property
    def pinned(self) -> set[Key]:
        return set(self._pinned)

    @property
    def resident(self) -> set[Key]:
        return set(self._resident)

    def access(self, key: Key, t: int, weight: float = 1.0) -> bool:
        if key in self._resident:
            return True
        if key in self._pinned:  # loaded on first use, then kept for good
            self._resident.add(key)
        return False


class BeladyPolicy(CachePolicy):
    """Belady's MIN with bypass. Needs ``next_use[i]`` for request ``i`` (``math.inf`` if never again).

    Call :meth:`access` with ``t`` equal to the request's position in the stream the ``next_use`` list was
    computed for (see :func:`next_use_positions`).
    """

    name = "belady"

    def __init__(self, capacity: int, next_use: Sequence[float]) -> None:
        super().__init__(capacity)
        self._next_use = next_use
        self._resident: dict[Key, float] = {}

    @property
    def resident(self) -> set[Key]:
        return set(self._resident)

    def access(self, key: Key, t: int, weight: float = 1.0) -> bool:
        nxt = self._next_use[t]
        if key in self._resident:
            self._resident[key] = nxt
            return True
        if len(self._resident) < self.capacity:
            self._resident[key] = nxt
            return False
        victim = max(self._resident, key=lambda k: self._resident[k])
        if self._resident[victim] > nxt:
            del self._resident[victim]
            self._resident[key] = nxt
        return False  # else: bypass, the new expert is used once and not kept


def next_use_positions(keys: Sequence[Key]) -> list[float]:
    """For each request position, the position of the next request of the same key (``inf`` if none)."""
    nxt: list[float] = [math.inf] * len(keys)
    seen: dict[Key, int] = {}
    for i in range(len(keys) - 1, -1, -1):
        nxt[i] = seen.get(keys[i], math.inf)
        seen[keys[i]] = i
    return nxt


POLICIES = ("lru", "lfu", "lfu_admit", "weighted_lru", "markov", "pin", "belady")


def make_policy(
    name: str,
    capacity: int,
    *,
    profile: dict[Key, float] | None = None,
    future: Iterable[Key] | None = None,
    decay: float = 0.9,
) -> CachePolicy:
    """Build a policy by name. ``pin`` needs ``profile``; ``belady`` needs ``future`` (the request keys)."""
    if name == "lru":
        return LRUPolicy(capacity)
    if name == "lfu":
        return LFUPolicy(capacity)
    if name == "lfu_admit":
        return LFUAdmitPolicy(capacity)
    if name == "weighted_lru":
        return WeightedLRUPolicy(capacity, decay=decay)
    if name == "markov":
        return MarkovPolicy(capacity)
    if name == "pin":
        if profile is None:
            raise ValueError("policy 'pin' needs a usage profile (expert -> frequency)")
        return PinPolicy(capacity, profile)
    if name == "belady":
        if future is None:
            raise ValueError("policy 'belady' is offline: it needs the whole future request stream")
        return BeladyPolicy(capacity, next_use_positions(list(future)))
    raise ValueError(f"unknown eviction policy {name!r}; expected one of {', '.join(POLICIES)}")
