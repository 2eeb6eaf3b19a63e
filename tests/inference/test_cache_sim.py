"""Expert-cache policies and the trace simulator, against hand-computed and brute-force answers."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from itertools import pairwise

import pytest
import torch

from moe_lab.inference.cache_policies import (
    POLICIES,
    BeladyPolicy,
    LFUAdmitPolicy,
    LFUPolicy,
    LRUPolicy,
    MarkovPolicy,
    PinPolicy,
    WeightedLRUPolicy,
    make_policy,
    next_use_positions,
)
from moe_lab.inference.cache_sim import compare_policies, format_table, simulate
from moe_lab.inference.trace import RoutingTrace, load_trace, save_trace


def _hits(policy, keys, weights=None):
    weights = weights or [1.0] * len(keys)
    return [policy.access(k, t, w) for t, (k, w) in enumerate(zip(keys, weights))]


def test_lru_hand_sequence():
    assert _hits(LRUPolicy(2), [1, 2, 1, 3, 2, 1]) == [False, False, True, False, False, False]
    assert _hits(LRUPolicy(2), [1, 2, 1, 3, 1, 2]) == [False, False, True, False, True, False]


def test_lfu_keeps_frequent():
    # 1 is used 3 times, 2 once: with capacity 2, the 3 evicts 2, not 1.
    p = LFUPolicy(2)
    _hits(p, [1, 1, 1, 2, 3])
    assert p.resident == {1, 3}


def test_lfu_admit_hand_sequence():
    # capacity 2: 1 and 2 fill the cache; 3 (count 1) does not beat the LFU victim 2 (count 1) -> bypass;
    # 3 again (count 2) beats 2 (count 1) -> admitted; 2 (count 2) ties the victim 1 (count 2, least
    # recent) -> bypass; 1 hits.
    p = LFUAdmitPolicy(2)
    assert _hits(p, [1, 1, 2, 3, 3, 2, 1]) == [False, True, False, False, False, False, True]
    assert p.resident == {1, 3}
    assert p.evict_candidate() == 3  # count 2 vs 3 for expert 1
    assert make_policy("lfu_admit", 3).name == "lfu_admit"


def _lfu_admit_reference(keys, capacity):
    """Slow restatement: counts so far; a miss with a full cache replaces the victim (lowest count, then
    least recent) only if the new key's count, this request included, is strictly higher."""
    hits, resident = [], []
    for t, k in enumerate(keys):
        seen = keys[: t + 1]
        count = {x: seen.count(x) for x in set(seen)}
        last = {x: max(i for i in range(t + 1) if keys[i] == x) for x in set(seen)}
        hits.append(k in resident)
        if k in resident:
            continue
        if len(resident) < capacity:
            resident.append(k)
            continue
        victim = sorted(resident, key=lambda x: (count[x], last[x]))[0]
        if count[k] > count[victim]:
            resident[resident.index(victim)] = k
    return hits, set(resident)


@pytest.mark.parametrize("seed", range(8))
def test_lfu_admit_matches_reference_and_belady_bounds_it(seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.arange(1, 9, dtype=torch.float).pow(-1.2)
    keys = torch.multinomial(probs, 120, replacement=True, generator=g).tolist()
    for cap in (1, 2, 3, 5):
        p = LFUAdmitPolicy(cap)
        hits = _hits(p, keys)
        ref_hits, ref_resident = _lfu_admit_reference(keys, cap)
        assert hits == ref_hits
        assert p.resident == ref_resident
        assert sum(_hits(BeladyPolicy(cap, next_use_positions(keys)), keys)) >= sum(hits)


def _markov_reference(tokens, capacity, a=1.0):
    """Slow restatement of ``markov``: before each token's requests, every count is recomputed from the whole
    history of token expert sets; candidates (resident or requested) score
    sum_{i in S} (pairs(i, j) + a * freq(j) / tokens) / (uses(i) + a); the victim is the lowest-scored
    resident outside the current token's set S."""
    history, resident, hits, score = [], set(), [], {}
    for s in tokens:
        history.append(list(dict.fromkeys(s)))
        freq = Counter(j for h in history for j in h)
        uses = Counter(i for h in history[:-1] for i in h)
        pairs = Counter((i, j) for h0, h1 in pairwise(history) for i in h0 for j in h1)
        for j in set(s) | resident:
            score[j] = sum((pairs[i, j] + a * freq[j] / len(history)) / (uses[i] + a) for i in history[-1])
        for k in s:
            hits.append(k in resident)
            if k in resident:
                continue
            if len(resident) < capacity:
                resident.add(k)
                continue
            others = resident - set(s)
            if not others:
                continue  # every resident is needed by this token: bypass
            victim = min(others, key=lambda x: (score[x], freq[x]))
            if (score[k], freq[k]) > (score[victim], freq[victim]):
                resident = (resident - {victim}) | {k}
    return hits, resident


def _markov_run(policy, tokens):
    hits, t = [], 0
    for s in tokens:
        policy.begin(s)
        for k in s:
            hits.append(policy.access(k, t))
            t += 1
    return hits


@pytest.mark.parametrize("seed", range(6))
def test_markov_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.arange(1, 11, dtype=torch.float).pow(-1.0)
    tokens = [torch.multinomial(probs, 3, generator=g).tolist() for _ in range(60)]
    for cap in (1, 3, 5, 8):
        p = MarkovPolicy(cap)
        hits = _markov_run(p, tokens)
        ref_hits, ref_resident = _markov_reference(tokens, cap)
        assert hits == ref_hits, cap
        assert p.resident == ref_resident
        assert len(p.resident) <= cap


def _protected_misses(name, cap, tokens):
    """Requests that missed although their expert was resident when the token's requests began."""
    p, t, bad = make_policy(name, cap), 0, 0
    for s in tokens:
        p.begin(s)
        before = p.resident
        for k in s:
            hit = p.access(k, t)
            assert hit or k not in before or not p.protects_current, (name, cap, t)
            bad += k in before and not hit
            t += 1
    return bad


@pytest.mark.parametrize("name", ["lru", "lfu_admit", "weighted_lru", "markov", "lfu"])
def test_policies_never_evict_an_expert_the_current_token_still_needs(name):
    # a token needs all its experts at once: one resident when its requests begin must be a hit, whatever the
    # order of the requests (random skewed streams, several capacities). Plain LFU, which always admits,
    # does not protect them, and does evict them on such streams.
    g = torch.Generator().manual_seed(7)
    probs = torch.arange(1, 13, dtype=torch.float).pow(-0.8)
    tokens = [torch.multinomial(probs, 4, generator=g).tolist() for _ in range(300)]
    bad = sum(_protected_misses(name, cap, tokens) for cap in (2, 4, 6))
    assert (bad > 0) == (name == "lfu")


def test_markov_on_a_cycle_reaches_belady_where_lru_and_lfu_never_hit():
    # experts 0, 1, 2 in a cycle with 2 slots: LRU (and LFU, whose counts tie) evict the expert needed next
    # and never hit; markov learns "2 is followed by 0, 0 by 1" and bypasses 2: from the second cycle on it
    # hits 2 of every 3 tokens, as many as Belady's optimum
    tokens = [[0], [1], [2]] * 10
    keys = [k for s in tokens for k in s]
    markov = _markov_run(MarkovPolicy(2), tokens)
    assert sum(_markov_run(LRUPolicy(2), tokens)) == 0
    assert sum(_markov_run(LFUPolicy(2), tokens)) == 0
    assert markov[3:] == [True, True, False] * 9
    assert sum(markov) == sum(_hits(BeladyPolicy(2, next_use_positions(keys)), keys))
    assert make_policy("markov", 2).name == "markov"
    with pytest.raises(ValueError, match="smoothing"):
        MarkovPolicy(2, smoothing=0.0)


def test_markov_global_scope_keeps_scores_per_group():
    # two layers share one cache: a layer's keys keep the score of that layer's last token
    p = MarkovPolicy(2)
    for t in range(6):
        p.begin([(0, t % 2)], group=0)
        p.access((0, t % 2), 2 * t)
        p.begin([(1, 5)], group=1)
        p.access((1, 5), 2 * t + 1)
    assert p.resident == {(0, 0), (1, 5)}  # layer 0 alternates, one slot for it; layer 1 always uses 5


def test_weighted_lru_prefers_heavy_weights():
    p = WeightedLRUPolicy(2, decay=0.99)
    _hits(p, [1, 2, 3], [0.9, 0.1, 0.5])
    assert p.resident == {1, 3}


def test_pin_never_churns():
    p = PinPolicy(2, {0: 10.0, 1: 5.0, 2: 1.0})
    assert _hits(p, [2, 0, 2, 0, 1, 1]) == [False, False, False, True, False, True]
    assert p.resident == {0, 1}


def test_next_use_positions():
    assert next_use_positions(["a", "b", "a", "c", "b"]) == [2, 4, float("inf"), float("inf"), float("inf")]


def _brute_force_optimum(keys, capacity):
    """Best hit count over every keep/evict decision (with bypass), by exhaustive search."""
    best = 0

    def rec(t, resident, hits):
        nonlocal best
        if t == len(keys):
            best = max(best, hits)
            return
        k = keys[t]
        if k in resident:
            rec(t + 1, resident, hits + 1)
            return
        rec(t + 1, resident, hits)  # bypass
        if len(resident) < capacity:
            rec(t + 1, resident | {k}, hits)
        else:
            for v in resident:
                rec(t + 1, (resident - {v}) | {k}, hits)

    rec(0, frozenset(), 0)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_belady_is_optimal_on_small_streams(seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, 5, (11,), generator=g).tolist()
    for cap in (1, 2, 3):
        belady = sum(_hits(BeladyPolicy(cap, next_use_positions(keys)), keys))
        assert belady == _brute_force_optimum(keys, cap)


def _random_trace(seed, n=300, layers=3, experts=8, k=2, skew=1.5):
    g = torch.Generator().manual_seed(seed)
    probs = torch.arange(1, experts + 1, dtype=torch.float).pow(-skew)
    idx = torch.stack(
        [torch.stack([torch.multinomial(probs, k, generator=g) for _ in range(layers)]) for _ in range(n)]
    )
    return RoutingTrace(idx, torch.rand(n, layers, k, generator=g), num_experts=experts)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_belady_bounds_every_policy(seed, scope):
    trace = _random_trace(seed)
    for cap in (1, 2, 4, 6):
        results = {r.policy: r for r in compare_policies(trace, [cap], scopes=[scope])}
        opt = results["belady"].hit_rate
        for name, r in results.items():
            assert r.requests == trace.num_tokens * trace.num_layers * trace.top_k
            assert r.hit_rate <= opt + 1e-12, (name, cap, r.hit_rate, opt)


def test_full_capacity_only_compulsory_misses():
    trace = _random_trace(0, experts=6)
    for policy in POLICIES:
        r = simulate(trace, policy, 6)
        distinct = sum(int((f > 0).sum()) for f in trace.expert_frequencies())
        assert r.misses == distinct, policy


def test_unused_slots_are_not_requests():
    idx = torch.tensor([[[0, -1]], [[0, 1]], [[-1, -1]]])
    trace = RoutingTrace(idx, torch.ones(3, 1, 2), num_experts=2)
    r = simulate(trace, "lru", 1)
    assert r.requests == 3
    assert r.hits == 1


def test_trace_roundtrip_and_errors(tmp_path):
    trace = _random_trace(1, n=20)
    p = save_trace(trace, tmp_path / "t.safetensors")
    back = load_trace(p)
    assert torch.equal(back.expert_indices, trace.expert_indices)
    assert torch.equal(back.weights, trace.weights)
    assert back.num_experts == trace.num_experts
    with pytest.raises(FileNotFoundError, match="trace file not found"):
        load_trace(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read routing trace"):
        load_trace(bad)
    with pytest.raises(ValueError, match="num_experts is 2"):
        RoutingTrace(torch.tensor([[[3]]]), torch.ones(1, 1, 1), num_experts=2)


def test_bad_policy_and_capacity():
    trace = _random_trace(2, n=10)
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'"):
        simulate(trace, "fifo", 2)
    with pytest.raises(ValueError, match="capacity must be a positive"):
        simulate(trace, "lru", 0)
    with pytest.raises(ValueError, match="capacity must be a positive"):
        make_policy("lru", 0)
    with pytest.raises(ValueError, match="needs the whole future"):
        make_policy("belady", 2)


def test_table_has_ratio_column():
    trace = _random_trace(3, n=50)
    table = format_table(compare_policies(trace, [2, 4]))
    assert "best online / belady" in table
    assert table.count("\n") == 3


def test_cli_cache_sim(tmp_path):
    trace = _random_trace(4, n=80)
    path = save_trace(trace, tmp_path / "trace.safetensors")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_lab",
            "cache-sim",
            str(path),
            "--capacity",
            "2,4",
            "--plot",
            str(tmp_path / "hit.png"),
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "belady" in out.stdout and "per_layer" in out.stdout
    assert (tmp_path / "hit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        [sys.executable, "-m", "moe_lab", "cache-sim", str(path), "--capacity", "99"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "exceeds the 8 experts" in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "moe_lab", "cache-sim", str(tmp_path / "nope.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "trace file not found" in missing.stderr


@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_belady_bounds_every_policy_on_a_recorded_trace(scope):
    # a trace recorded from a model's own routing (real sequences of decisions, not i.i.d. draws)
    from moe_lab.inference.trace import record_trace
    from moe_lab.models import MoEModel

    torch.manual_seed(0)
    model = MoEModel.from_preset("tiny", num_experts=8, num_layers=3).eval()
    text = torch.tensor(list(b"the experts of a mixture route every token to a few of them. " * 12))
    batches = list(text[: 4 * 128].view(4, 128).split(2))
    trace = record_trace(model, batches)
    assert trace.num_tokens == 512 and trace.num_experts == 8
    for cap in (1, 2, 4, 6):
        results = {r.policy: r for r in compare_policies(trace, [cap], scopes=[scope])}
        opt = results["belady"].hit_rate
        for name, r in results.items():
            assert r.hit_rate <= opt + 1e-12, (name, cap, r.hit_rate, opt)


def test_cli_cache_sim_writes_a_plot_by_default_and_pin_is_not_online(tmp_path):
    trace = _random_trace(5, n=80)
    path = save_trace(trace, tmp_path / "trace.safetensors")
    out = subprocess.run(
        [sys.executable, "-m", "moe_lab", "cache-sim", str(path), "--capacity", "2", "--policies", "lru,pin,belady"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "trace.cache-sim.png").is_file()
    assert "not counted as online" in out.stdout
    results = {r.policy: r for r in compare_policies(trace, [2], ["lru", "pin", "belady"], ["per_layer"])}
    ratio = results["lru"].hit_rate / results["belady"].hit_rate
    assert f"| per_layer | 2 | {results['lru'].hit_rate:.3f} | {results['pin'].hit_rate:.3f} | " in out.stdout
    assert f"| {ratio:.3f} |" in out.stdout  # best online = lru, not the trace-fitted pin
