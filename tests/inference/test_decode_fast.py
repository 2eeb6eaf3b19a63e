"""Decode-speed changes keep behaviour: logits_to_keep, skipped eval router losses, the growing KV cache,
the one-query attention path and the generate buffers (compared with plain recomputation)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from moe_lab.inference.generate import generate
from moe_lab.models import MoEModel
from moe_lab.nn.transformer import Attention, KVCache, RotaryEmbedding, build_attention_mask, repeat_kv

TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48)


def _model(seed: int = 0, **kw) -> MoEModel:
    torch.manual_seed(seed)
    return MoEModel(**{**TINY, "num_experts": 4, "experts_per_token": 2, **kw}).eval()


def _grow(cache: KVCache, sizes: tuple[int, ...]) -> Iterator[tuple[torch.Tensor, int]]:
    """Append random keys/values of these lengths; check each result equals concatenation; yield (keys, P)."""
    ks, vs = [], []
    for s in sizes:
        k, v = torch.randn(2, 3, s, 4), torch.randn(2, 3, s, 4)
        ks.append(k)
        vs.append(v)
        with torch.no_grad():
            got_k, got_v = cache.update(0, k, v)
        assert torch.equal(got_k, torch.cat(ks, dim=-2)) and torch.equal(got_v, torch.cat(vs, dim=-2))
        yield got_k, sum(x.shape[-2] for x in ks)


def test_logits_to_keep_is_the_tail_and_defaults_to_all() -> None:
    model = _model()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        three = model(ids, logits_to_keep=3).logits
        more = model(ids, logits_to_keep=50).logits
    assert full.shape == (2, 7, 64) and last.shape == (2, 1, 64) and three.shape == (2, 3, 64)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(three, full[:, -3:], rtol=0, atol=1e-6)
    torch.testing.assert_close(more, full, rtol=0, atol=0)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)


def test_router_losses_skipped_only_in_eval_without_labels() -> None:
    from moe_lab.nn.losses import load_balancing_loss

    model = _model(aux_loss_coef=0.1, z_loss_coef=0.01)
    ids = torch.randint(0, 64, (2, 6))
    out = model(ids)
    assert float(out.aux_loss) == 0.0 and float(out.z_loss) == 0.0 and out.loss is None
    assert len(out.routing) == 2  # routing is still returned
    with_labels = model(ids, labels=ids)  # eval with labels: computed (evaluation loops read them)
    want = 0.1 * sum(load_balancing_loss(d) for d in with_labels.routing)
    torch.testing.assert_close(with_labels.aux_loss, want)
    assert float(with_labels.z_loss.detach()) > 0
    model.train()
    train_out = model(ids)  # training without labels: still computed
    assert float(train_out.aux_loss.detach()) > 0 and float(train_out.z_loss.detach()) > 0


@pytest.mark.parametrize("concat_max_numel", [0, 200, KVCache.concat_max_numel])
def test_kv_cache_buffers_equal_concatenation(monkeypatch: pytest.MonkeyPatch, concat_max_numel: int) -> None:
    monkeypatch.setattr(KVCache, "concat_max_numel", concat_max_numel)  # 0: buffers from the first step
    torch.manual_seed(0)
    cache = KVCache(1)
    for got_k, _ in _grow(cache, (5, 1, 1, 3, 70, 1)):  # 70 forces a regrow of the buffer
        assert cache.keys[0] is got_k and cache.get_seq_length() == got_k.shape[-2]
    assert (cache._key_buf[0] is not None) == (concat_max_numel < 2 * 3 * 81 * 4)
    first = cache.keys[0].clone()
    kept = cache.select(torch.tensor([1]))  # fresh tensors: updating the copy leaves the original alone
    with torch.no_grad():
        kept.update(0, torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))
    assert torch.equal(cache.keys[0], first) and kept.get_seq_length() == first.shape[-2] + 1
    held = cache.keys[0]
    cache.keys[0] = held[..., :-1, :]  # a replaced (truncated) tensor is copied, never written over
    cache.values[0] = cache.values[0][..., :-1, :]
    with torch.no_grad():
        k2, _ = cache.update(0, torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4))
    assert torch.equal(k2[..., :-1, :], first[..., :-1, :]) and not k2[..., -1, :].any()
    assert torch.equal(held, first)


def test_kv_cache_under_autograd_concatenates_and_backpropagates() -> None:
    cache = KVCache(1)
    k0 = torch.randn(1, 2, 3, 4, requires_grad=True)
    k1 = torch.randn(1, 2, 1, 4, requires_grad=True)
    cache.update(0, k0, k0 * 1)
    k_all, _ = cache.update(0, k1, k1 * 1)
    k_all.sum().backward()
    assert k0.grad is not None and torch.equal(k0.grad, torch.ones_like(k0))
    assert k1.grad is not None and torch.equal(k1.grad, torch.ones_like(k1))


@pytest.mark.parametrize("padded", [False, True])
def test_one_query_attention_equals_repeated_heads(padded: bool) -> None:
    torch.manual_seed(1)
    attn = Attention(32, num_heads=4, num_kv_heads=2).eval()
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 6, 32)
    mask = torch.ones(2, 6, dtype=torch.long)
    if padded:
        mask[0, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cos, sin = rope(pos, x.dtype)
    with torch.no_grad():
        cache = KVCache(1)
        attn(x[:, :5], cos[:, :5], sin[:, :5], build_attention_mask(mask[:, :5], 5, 0, x.device), cache)
        step_mask = MoEModel._attention_mask(mask, 1, 5, x.device)
        got = attn(x[:, 5:], cos[:, 5:], sin[:, 5:], step_mask, cache)
        # plain reference: repeat the key/value heads, explicit mask from build_attention_mask
        q = attn.q_proj(x[:, 5:]).view(2, 1, 4, 8).transpose(1, 2)
        from moe_lab.nn.transformer import apply_rotary

        q = apply_rotary(q, cos[:, 5:], sin[:, 5:])
        k_all, v_all = cache.keys[0], cache.values[0]
        assert k_all is not None and v_all is not None
        ref = F.scaled_dot_product_attention(
            q, repeat_kv(k_all, 2), repeat_kv(v_all, 2), attn_mask=build_attention_mask(mask, 1, 5, x.device)
        )
        ref = attn.o_proj(ref.transpose(1, 2).reshape(2, 1, 32))
    assert (step_mask is None) == (not padded)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("concat_max_numel", [0, KVCache.concat_max_numel])
@pytest.mark.parametrize("experts", [4, 8])
def test_generate_matches_full_recomputation(
    monkeypatch: pytest.MonkeyPatch, experts: int, concat_max_numel: int
) -> None:
    monkeypatch.setattr(KVCache, "concat_max_numel", concat_max_numel)
    model = _model(seed=experts, num_experts=experts)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8]]  # left padding exercised
    fast = generate(model, prompts, max_new_tokens=6)
    slow = generate(model, prompts, max_new_tokens=6, use_cache=False)
    assert fast.new_tokens == slow.new_tokens
    assert torch.equal(fast.sequences, slow.sequences) and torch.equal(
        fast.attention_mask, slow.attention_mask
    )
    # reference: greedy argmax of a plain full forward (all logits) per step
    ids = torch.tensor(prompts[0])[None]
    with torch.no_grad():
        for _ in range(6):
            nxt = model(ids).logits[:, -1].argmax(-1)
            ids = torch.cat((ids, nxt[:, None]), dim=1)
    assert fast.new_tokens[0] == ids[0, 5:].tolist()


def test_generate_stop_rows_are_padded_and_masked() -> None:
    model = _model(seed=3)
    first = generate(model, [[1, 2, 3], [4, 5, 6]], max_new_tokens=5)
    eos = first.new_tokens[0][1]
    n = first.new_tokens[0].index(eos) + 1  # row 0 stops after n tokens
    out = generate(model, [[1, 2, 3], [4, 5, 6]], max_new_tokens=5, eos_token_id=eos, pad_token_id=0)
    assert out.finish_reason[0] == "stop" and out.new_tokens[0] == first.new_tokens[0][:n]
    row0_pad = out.sequences[0, 3 + n :]
    assert (
        torch.equal(row0_pad, torch.zeros_like(row0_pad)) and int(out.attention_mask[0, 3 + n :].sum()) == 0
    )
    assert out.sequences.is_contiguous() and out.sequences.shape == out.attention_mask.shape


def test_kv_cache_with_capacity_allocates_once_and_equals_concatenation() -> None:
    torch.manual_seed(5)
    cache = KVCache(1, capacity=10)
    for got_k, length in _grow(cache, (4, 1, 1, 1, 3, 2)):  # 12 positions: the last outgrows the capacity
        buf = cache._key_buf[0]
        assert buf is not None and got_k.data_ptr() == buf.data_ptr()  # a view of the buffer, no copy
        if length <= 10:
            assert buf.shape[-2] == 10  # allocated at the capacity on the first update, never regrown
            first_buf = buf
    assert cache._key_buf[0] is not first_buf and cache.get_seq_length() == 12
    kept = cache.select(torch.tensor([0]))
    assert kept.capacity == 10 and torch.equal(kept.keys[0], cache.keys[0][:1])
    with pytest.raises(ValueError, match="capacity"):
        KVCache(1, capacity=-1)


@pytest.mark.parametrize("qk_norm", ["none", "full", "per_head"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_decode_step_equals_the_full_forward(qk_norm: str, kv_heads: int) -> None:
    torch.manual_seed(6)
    attn = Attention(32, num_heads=4, num_kv_heads=kv_heads, qk_norm=qk_norm).eval()
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 8, 32)
    cos, sin = rope(torch.arange(8)[None].expand(2, 8), x.dtype)
    with torch.no_grad():
        full = attn(x, cos, sin)
        for capacity in (None, 8):
            cache = KVCache(1, capacity=capacity)
            outs = [attn(x[:, :5], cos[:, :5], sin[:, :5], None, cache)]
            for i in range(5, 8):  # one new position at a time: the decode branch
                outs.append(attn(x[:, i : i + 1], cos[:, i : i + 1], sin[:, i : i + 1], None, cache))
            torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-6)


def test_generate_without_padding_matches_recomputation() -> None:
    model = _model(seed=11, num_experts=8)  # 8 experts, top-2: batch 5 decodes through the "grouped" path
    prompts = [[i, i + 1, i + 2, i + 3] for i in range(1, 40, 8)]  # equal lengths: no attention mask at all
    fast = generate(model, prompts, max_new_tokens=6)
    slow = generate(model, prompts, max_new_tokens=6, use_cache=False)
    assert fast.new_tokens == slow.new_tokens and torch.equal(fast.sequences, slow.sequences)
    ids = torch.tensor(prompts)
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat((ids, model(ids).logits[:, -1].argmax(-1)[:, None]), dim=1)
    assert fast.new_tokens == ids[:, 4:].tolist()
    assert bool(fast.attention_mask.all()) and fast.finish_reason == ["length"] * 5


def test_fused_qkv_cache_follows_weight_changes_and_grad_mode() -> None:
    torch.manual_seed(7)
    attn = Attention(32, num_heads=4, num_kv_heads=2, qkv_bias=True).eval()
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 6, 32)
    cos, sin = rope(torch.arange(6)[None].expand(2, 6), x.dtype)

    def decode_last() -> torch.Tensor:
        cache = KVCache(1)
        attn(x[:, :5], cos[:, :5], sin[:, :5], None, cache)
        return attn(x[:, 5:], cos[:, 5:], sin[:, 5:], None, cache)

    with torch.no_grad():
        before = decode_last()
        torch.testing.assert_close(before, attn(x, cos, sin)[:, 5:], rtol=0, atol=1e-6)
        attn.k_proj.weight.mul_(2.0)  # in place: the cached concatenation must be rebuilt
        attn.v_proj.bias.add_(1.0)
        after = decode_last()
        torch.testing.assert_close(after, attn(x, cos, sin)[:, 5:], rtol=0, atol=1e-6)
    assert not torch.allclose(before, after)
    with_grad = decode_last()  # grad mode: separate projections, gradients reach every weight
    with_grad.sum().backward()
    assert all(p.grad is not None for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.bias))
    torch.testing.assert_close(with_grad.detach(), after, rtol=0, atol=1e-6)
    assert not any("qkv" in name for name in attn.state_dict())  # the fused copy is never saved


@pytest.mark.parametrize("tie", [True, False])
def test_decode_head_copy_matches_lm_head_and_follows_weight_changes(tie: bool) -> None:
    torch.manual_seed(3)
    model = MoEModel.from_preset("tiny", tie_embeddings=tie).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))

    def plain_logits() -> torch.Tensor:  # the same forward with the copy turned off
        model.DECODE_HEAD_MAX_BYTES = 0
        try:
            return model(ids, logits_to_keep=1).logits
        finally:
            del model.DECODE_HEAD_MAX_BYTES

    with torch.no_grad():
        fast = model(ids, logits_to_keep=1).logits
        assert "_decode_head_cache" in model.__dict__  # one row, no autograd: the [D, V] copy was used
        torch.testing.assert_close(fast, plain_logits(), rtol=1e-5, atol=1e-5)
        model.lm_head.weight.mul_(-1.5)  # in place: the copy must be rebuilt
        torch.testing.assert_close(model(ids, logits_to_keep=1).logits, plain_logits(), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(ids, logits_to_keep=1).logits, fast)
        eight = model(ids.repeat(8, 1), logits_to_keep=1).logits  # 8 rows: the copy too
        torch.testing.assert_close(eight, plain_logits().expand(8, -1, -1), rtol=1e-5, atol=1e-5)
        del model.__dict__["_decode_head_cache"]
        many = model(ids.repeat(model.DECODE_HEAD_MAX_ROWS + 1, 1), logits_to_keep=1).logits
        assert "_decode_head_cache" not in model.__dict__  # more rows: the plain projection
        torch.testing.assert_close(many[0], plain_logits()[0], rtol=1e-5, atol=1e-5)
    out = model(ids, logits_to_keep=1).logits  # grad mode: the real weight, gradients reach it
    out.sum().backward()
    assert model.lm_head.weight.grad is not None
    assert not any("decode_head" in name for name in model.state_dict())
