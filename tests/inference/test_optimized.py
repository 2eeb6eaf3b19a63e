"""Offloaded, quantised and selectively loaded experts against the fully loaded model."""

from __future__ import annotations

import pytest
import torch

from moe_lab.inference.expert_modules import CachedExperts
from moe_lab.inference.optimized import OptimizedMoEModel, load_model, perplexity, usage_profile
from moe_lab.models import MoEModel


def _model(impl="loop", seed=0, **kw):
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=128,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        num_experts=8,
        experts_per_token=2,
        ffn_hidden_size=48,
        impl=impl,
    )
    fields.update(kw)
    m = MoEModel(**fields)
    # spread the router so that many experts are used
    for layer in m.moe_layers():
        torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
    return m.eval()


def _copy(model):
    clone = MoEModel(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def _ids(seed=1, b=2, s=24):
    return torch.randint(0, 128, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scope", ["per_layer", "global"])
@pytest.mark.parametrize(
    ("policy", "capacity", "storage"),
    [(p, c, "host") for p in ("lru", "lfu", "lfu_admit", "weighted_lru", "markov", "pin") for c in (1, 3, 8)]
    + [("lru", 1, "disk"), ("weighted_lru", 8, "disk"), ("lfu_admit", 3, "disk"), ("markov", 3, "disk")],
)
def test_cached_model_equals_full_model(policy, capacity, storage, scope, tmp_path):
    base = _model()
    ids = _ids()
    with torch.no_grad():
        ref = base(ids).logits
    opt = OptimizedMoEModel(_copy(base))
    profile = torch.arange(24, dtype=torch.float).reshape(3, 8)
    cache = opt.enable_dynamic_loading(
        capacity, policy, scope=scope, storage=storage, offload_dir=tmp_path / "experts", profile=profile
    )
    with torch.no_grad():
        out = opt(ids).logits
        out2 = opt(ids).logits
    assert torch.equal(out, ref)
    assert torch.equal(out2, ref)
    stats = cache.get_stats()
    assert stats.requests > 0
    assert stats.hits + stats.misses == stats.requests
    if scope == "per_layer":
        assert len(cache.resident_experts(0)) <= capacity
    else:
        assert sum(len(cache.resident_experts(i)) for i in range(3)) <= capacity * 3
    if capacity == 8 and policy != "pin":
        assert stats.hits > 0
    opt.close()


def test_cached_model_close_to_grouped_path():
    base = _model(impl="auto")
    ids = _ids()
    with torch.no_grad():
        ref = base(ids).logits
    opt = OptimizedMoEModel(_copy(base))
    opt.enable_dynamic_loading(2, "lru", storage="host")
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("policy", "batch"), [("lru", 1), ("markov", 1), ("lfu_admit", 3), ("lru", 8)])
def test_cached_decoding_equals_full_model(policy, batch, monkeypatch):
    # KV-cache decoding: batches of up to 4 tokens (top-2: 8 slots) take the experts' decode_forward (the
    # "pairs" loop over cached experts, the full model's decode method too: the same bits), larger ones the
    # dispatch (the full model decodes 8 tokens with its own "grouped" method: equal up to rounding)
    base = _model()  # impl="loop": the prefill runs the same per-expert matmuls as the cached experts
    ids = _ids(b=batch, s=6)
    opt = OptimizedMoEModel(_copy(base))
    cache = opt.enable_dynamic_loading(3, policy, storage="host")
    dispatched = []
    forward = CachedExperts.forward
    monkeypatch.setattr(
        CachedExperts, "forward", lambda self, *a, **k: dispatched.append(1) or forward(self, *a, **k)
    )
    outs = []
    with torch.no_grad():
        for model in (base, opt.model):
            out = model(ids, use_cache=True)
            kv, steps = out.kv_cache, [out.logits[:, -1]]
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(5):
                out = model(nxt, kv_cache=kv, use_cache=True)
                kv = out.kv_cache
                steps.append(out.logits[:, -1])
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            outs.append(torch.stack(steps))
    if batch * 2 <= 8:
        assert torch.equal(outs[0], outs[1])
        assert len(dispatched) == 3  # the prefill only, once per layer
    else:
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
        assert len(dispatched) == 3 * 6
    st = cache.get_stats()
    assert st.requests > 0 and st.hits + st.misses == st.requests
    opt.close()


@pytest.mark.parametrize("policy", ["lru", "markov"])
def test_prefetch_and_global_scope(policy):
    base = _model()
    ids = _ids(b=1, s=40)
    with torch.no_grad():
        ref = base(ids).logits
    opt = OptimizedMoEModel(_copy(base))
    cache = opt.enable_dynamic_loading(3, policy, scope="global", storage="host", prefetch=True)
    with torch.no_grad():
        for t in range(1, ids.shape[1] + 1):  # token by token, like decoding without a KV cache
            out = opt(ids[:, :t]).logits
    assert torch.equal(out, ref)
    st = cache.get_stats()
    assert st.prefetched > 0
    assert 0.0 <= st.prefetch_accuracy <= 1.0
    assert st.bytes_loaded > 0
    opt.close()


def test_quantized_int8_close_and_smaller():
    base = _model()
    ids = _ids()
    with torch.no_grad():
        ref = base(ids).logits
    opt = OptimizedMoEModel(_copy(base))
    full_bytes = opt.expert_weight_bytes()
    opt.quantize(bits=8)
    with torch.no_grad():
        out = opt(ids).logits
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 0.02, float(err)
    assert opt.expert_weight_bytes() < 0.3 * full_bytes
    # routers untouched
    for a, b in zip(base.moe_layers(), opt.model.moe_layers()):
        assert torch.equal(a.router.gate.weight, b.router.gate.weight)


def test_quantized_int4_bounded_error():
    base = _model()
    ids = _ids()
    with torch.no_grad():
        ref = base(ids).logits
    opt = OptimizedMoEModel(_copy(base)).quantize(bits=4, group_size=16)
    with torch.no_grad():
        out = opt(ids).logits
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 0.2, float(err)


def _kv_decode_logits(model, ids, steps=4):
    """Last-position logits of a KV-cache decode of ``ids[:, -steps:]`` after prefilling the rest."""
    with torch.no_grad():
        out = model(ids[:, :-steps], use_cache=True)
        kv, logits = out.kv_cache, []
        for t in range(ids.shape[1] - steps, ids.shape[1]):
            out = model(ids[:, t : t + 1], kv_cache=kv, use_cache=True)
            kv = out.kv_cache
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("transform", ["int8", "int4", "subset"])
def test_decode_forward_of_replacement_experts_matches_dispatch(transform, tmp_path):
    # decoding one or two sequences takes the experts' decode_forward ("pairs" loop); the same model run over
    # the whole sequence (more rows) dispatches through forward(): the logits agree position by position
    base = _model()
    if transform == "subset":
        base.save_pretrained(str(tmp_path / "m"))
        prof = usage_profile(base, [_ids(seed=s) for s in range(3)])
        opt = OptimizedMoEModel.from_pretrained(
            tmp_path / "m", expert_selection_strategy="frequency_based", num_experts_to_load=5, usage=prof
        )
    else:
        opt = OptimizedMoEModel(_copy(base)).quantize(bits=8 if transform == "int8" else 4, group_size=16)
    for b in (1, 2):
        ids = _ids(seed=3, b=b, s=12)
        with torch.no_grad():
            full = opt(ids).logits[:, -4:]
        torch.testing.assert_close(_kv_decode_logits(opt.model, ids), full, rtol=1e-5, atol=1e-5)


def test_selective_loading_routes_to_loaded_experts(tmp_path):
    base = _model()
    base.save_pretrained(str(tmp_path / "m"))
    calib = [_ids(seed=s) for s in range(3)]
    prof = usage_profile(base, calib)
    assert prof.shape == (3, 8)
    opt = OptimizedMoEModel.from_pretrained(
        tmp_path / "m", expert_selection_strategy="frequency_based", num_experts_to_load=4, usage=prof
    )
    for i, keep in opt.loaded_experts.items():
        expected = sorted(sorted(range(8), key=lambda j: (-float(prof[i, j]), j))[:4])
        assert keep == expected
    with torch.no_grad():
        out = opt(_ids(seed=9))
    for i, d in enumerate(out.routing):
        used = set(d.expert_indices[d.slot_mask].tolist())
        assert used <= set(opt.loaded_experts[i])
    # all experts kept -> same perplexity as the full model
    full = OptimizedMoEModel.from_pretrained(
        tmp_path / "m", expert_selection_strategy="frequency_based", num_experts_to_load=8, usage=prof
    )
    data = [_ids(seed=20)]
    assert perplexity(full, data) == pytest.approx(perplexity(base, data), rel=1e-6)
    assert perplexity(opt, data) > 0


@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_cache_size_as_a_byte_budget(scope):
    # one expert of _model(): SwiGLU 32 -> 48 -> 32 in float32 = 3 x 32 x 48 x 4 bytes = 18,432 bytes
    per_expert = 3 * 32 * 48 * 4
    budget = 3 * per_expert + per_expert // 2  # 3.5 experts per layer
    layers = 3
    total = budget if scope == "per_layer" else budget * layers
    base = _model()
    ids = _ids()
    with torch.no_grad():
        ref = base(ids).logits
    opt = OptimizedMoEModel(_copy(base))
    cache = opt.enable_dynamic_loading(f"{total}B", "lru", scope=scope, storage="host")
    assert cache.capacity == 3  # whole experts only
    with torch.no_grad():
        assert torch.equal(opt(ids).logits, ref)
    # the resident bytes never exceed the budget (per layer: each layer's share)
    assert cache.resident_bytes() <= budget * layers
    assert opt.expert_weight_bytes() == cache.resident_bytes()
    if scope == "per_layer":
        assert all(len(cache.resident_experts(i)) <= 3 for i in range(layers))
    opt.close()
    # decimal and binary units
    assert OptimizedMoEModel(_copy(base)).enable_dynamic_loading("0.1MB", storage="host").capacity == 5
    assert OptimizedMoEModel(_copy(base)).enable_dynamic_loading("0.1MiB", storage="host").capacity == 5


def test_cache_size_budget_errors():
    opt = OptimizedMoEModel(_copy(_model()))
    with pytest.raises(
        ValueError, match=r"cache_size '10KB' holds no expert per layer \(one expert is 18,432"
    ):
        opt.enable_dynamic_loading("10KB", storage="host")
    with pytest.raises(ValueError, match="cache_size: expected a size such as"):
        opt.enable_dynamic_loading("lots", storage="host")
    assert opt.cache is None  # nothing half-enabled


def test_bad_cache_arguments_write_no_offload_files(tmp_path):
    opt = OptimizedMoEModel(_copy(_model()))
    for args, kwargs, message in (
        ((0,), {}, "cache_size must be a positive"),
        ((2, "fifo"), {}, "eviction_policy must be one of"),
        ((2, "pin"), {}, "needs a usage profile"),
        ((2,), {"scope": "shared"}, "scope must be"),
    ):
        with pytest.raises(ValueError, match=message):
            opt.enable_dynamic_loading(*args, offload_dir=tmp_path / "experts", **kwargs)
        assert not (tmp_path / "experts").exists() or not any((tmp_path / "experts").iterdir())
    assert opt.cache is None


def test_selective_loading_refuses_expert_choice_routers():
    opt = OptimizedMoEModel(_copy(_model(router_type="expert_choice", capacity_factor=1.0)))
    with pytest.raises(ValueError, match="needs token-choice routers"):
        opt.select_experts(4)


def test_errors(tmp_path):
    base = _model()
    opt = OptimizedMoEModel(_copy(base))
    with pytest.raises(ValueError, match="cache_size must be a positive"):
        opt.enable_dynamic_loading(0)
    with pytest.raises(ValueError, match="eviction_policy must be one of"):
        opt.enable_dynamic_loading(2, "fifo")
    with pytest.raises(ValueError, match="belady is offline"):
        opt.enable_dynamic_loading(2, "belady")
    with pytest.raises(ValueError, match="needs a usage profile"):
        opt.enable_dynamic_loading(2, "pin")
    with pytest.raises(ValueError, match="num_experts_to_load must be an int"):
        opt.select_experts(1)
    with pytest.raises(FileNotFoundError, match="model path not found"):
        load_model(tmp_path / "nope")
    base.save_pretrained(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="expert_selection_strategy must be one of"):
        OptimizedMoEModel.from_pretrained(tmp_path / "m", expert_selection_strategy="best")


def test_usage_profile_from_a_trace_file(tmp_path):
    from moe_lab.inference.trace import record_trace, save_trace

    base = _model()
    base.save_pretrained(str(tmp_path / "m"))
    calib = [_ids(seed=s) for s in range(3)]
    path = save_trace(record_trace(base, calib), tmp_path / "calib.safetensors")
    a = OptimizedMoEModel.from_pretrained(
        tmp_path / "m", expert_selection_strategy="frequency_based", num_experts_to_load=4, usage=path
    )
    b = OptimizedMoEModel.from_pretrained(
        tmp_path / "m", expert_selection_strategy="frequency_based", num_experts_to_load=4,
        usage=usage_profile(base, calib),
    )  # fmt: skip
    assert a.loaded_experts == b.loaded_experts
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(ValueError, match="not a usage profile"):
        OptimizedMoEModel.from_pretrained(
            tmp_path / "m", expert_selection_strategy="frequency_based", num_experts_to_load=4,
            usage=tmp_path / "bad.json",
        )  # fmt: skip
