"""Transformer blocks against slow, obvious references (and Hugging Face's functions where installed)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_lab.nn.transformer import (
    Attention,
    DecoderBlock,
    DenseFFN,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    build_attention_mask,
    repeat_kv,
)


def _ref_rmsnorm(x, w, eps):
    x32 = x.double()
    return (w.double() * (x32 / torch.sqrt((x32**2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def _ref_rotary(x_BHSD, pos_BS, theta):
    """Rotate each pair (i, i + Dh/2) by angle pos * theta^(-2i/Dh), one element at a time."""
    b, h, s, d = x_BHSD.shape
    out = torch.empty_like(x_BHSD, dtype=torch.float64)
    half = d // 2
    for bi in range(b):
        for si in range(s):
            for i in range(half):
                ang = float(pos_BS[bi, si]) * theta ** (-2.0 * i / d)
                c, sn = math.cos(ang), math.sin(ang)
                x1, x2 = x_BHSD[bi, :, si, i].double(), x_BHSD[bi, :, si, i + half].double()
                out[bi, :, si, i] = x1 * c - x2 * sn
                out[bi, :, si, i + half] = x2 * c + x1 * sn
    return out


def _ref_attention(attn: Attention, x_BSD, pos_BS, key_mask_BS=None, theta=10000.0):
    """Naive GQA attention: explicit per-head loops, float64, causal + key-padding mask."""
    b, s, _ = x_BSD.shape
    hd, nh, nkv = attn.head_dim, attn.num_heads, attn.num_kv_heads
    q, k, v = attn.q_proj(x_BSD), attn.k_proj(x_BSD), attn.v_proj(x_BSD)
    if attn.qk_norm == "full":
        q = _ref_rmsnorm(q, attn.q_norm.weight, attn.q_norm.eps)
        k = _ref_rmsnorm(k, attn.k_norm.weight, attn.k_norm.eps)
    q = q.view(b, s, nh, hd)
    k = k.view(b, s, nkv, hd)
    if attn.qk_norm == "per_head":
        q = _ref_rmsnorm(q, attn.q_norm.weight, attn.q_norm.eps)
        k = _ref_rmsnorm(k, attn.k_norm.weight, attn.k_norm.eps)
    q = _ref_rotary(q.transpose(1, 2), pos_BS, theta)
    k = _ref_rotary(k.transpose(1, 2), pos_BS, theta)
    v = v.view(b, s, nkv, hd).transpose(1, 2).double()
    out = torch.zeros(b, nh, s, hd, dtype=torch.float64)
    for bi in range(b):
        for h in range(nh):
            g = h // (nh // nkv)
            for i in range(s):
                keep = [j for j in range(i + 1) if key_mask_BS is None or bool(key_mask_BS[bi, j]) or j == i]
                scores = torch.stack([q[bi, h, i] @ k[bi, g, j] for j in keep]) / math.sqrt(hd)
                w = torch.softmax(scores, dim=0)
                out[bi, h, i] = sum(wj * v[bi, g, j] for wj, j in zip(w, keep))
    merged = out.transpose(1, 2).reshape(b, s, nh * hd).to(x_BSD.dtype)
    return attn.o_proj(merged)


def _run(attn, x, pos, mask_BS=None, theta=10000.0):
    rope = RotaryEmbedding(attn.head_dim, theta)
    cos, sin = rope(pos, x.dtype)
    return attn(x, cos, sin, build_attention_mask(mask_BS, x.shape[1], 0, x.device))


def test_rmsnorm_matches_reference_and_computes_in_fp32():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(norm(x), _ref_rmsnorm(x, norm.weight, 1e-5), rtol=1e-6, atol=1e-6)
    xb = (torch.randn(4, 16) * 100).bfloat16()
    assert norm(xb).dtype == torch.float32  # fp32 weight * bf16 normalised input promotes, as in HF
    torch.testing.assert_close(
        norm(xb), norm.weight * (_ref_rmsnorm(xb.float(), torch.ones(16), 1e-5).bfloat16())
    )


def test_rotary_matches_elementwise_reference_and_is_relative():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, theta=500.0)
    pos = torch.tensor([[0, 1, 5], [3, 7, 11]])
    x = torch.randn(2, 2, 3, 8)
    cos, sin = rope(pos, x.dtype)
    torch.testing.assert_close(
        apply_rotary(x, cos, sin).double(), _ref_rotary(x, pos, 500.0), rtol=1e-5, atol=1e-5
    )
    # dot products depend only on the position difference
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def dot(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]), q.dtype)
        ck, sk = rope(torch.tensor([[pk]]), k.dtype)
        return float((apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum())

    assert dot(9, 4) == pytest.approx(dot(25, 20), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("qk_norm", ["none", "full", "per_head"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_naive_reference(qk_norm, kv_heads):
    torch.manual_seed(1)
    attn = Attention(32, num_heads=4, num_kv_heads=kv_heads, qk_norm=qk_norm, qkv_bias=True).double()
    if attn.q_norm is not None:
        attn.q_norm.weight.data.uniform_(0.5, 1.5)
        attn.k_norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    pos = torch.arange(6)[None].expand(2, 6)
    torch.testing.assert_close(
        _run(attn, x, pos), _ref_attention(attn, x, pos), rtol=1e-6, atol=1e-7
    )  # rotary tables are fp32 (as in HF)


def test_attention_with_key_padding_matches_reference_and_has_no_nans():
    torch.manual_seed(2)
    attn = Attention(32, num_heads=4, num_kv_heads=2).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = _run(attn, x, pos, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out, _ref_attention(attn, x, pos, mask), rtol=1e-6, atol=1e-7
    )  # rotary tables are fp32 (as in HF)


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(3)
    gqa = Attention(32, num_heads=4, num_kv_heads=2)
    mha = Attention(32, num_heads=4, num_kv_heads=4)
    hd = gqa.head_dim
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(2, hd, 32)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(4 * hd, 32))
    x = torch.randn(2, 7, 32)
    pos = torch.arange(7)[None].expand(2, 7)
    torch.testing.assert_close(_run(gqa, x, pos), _run(mha, x, pos), rtol=1e-5, atol=1e-6)
    kv = torch.randn(2, 3, 4, 5)
    assert torch.equal(repeat_kv(kv, 2), kv.repeat_interleave(2, dim=1))


def test_kv_cache_incremental_equals_full():
    torch.manual_seed(4)
    attn = Attention(32, num_heads=4, num_kv_heads=2, qk_norm="per_head")
    rope = RotaryEmbedding(attn.head_dim)
    x = torch.randn(2, 6, 32)
    pos = torch.arange(6)[None].expand(2, 6)
    cos, sin = rope(pos, x.dtype)
    full = attn(x, cos, sin)
    cache = KVCache(1)
    outs = []
    for start, stop in ((0, 3), (3, 4), (4, 6)):
        mask = build_attention_mask(None, stop - start, start, x.device)
        outs.append(attn(x[:, start:stop], cos[:, start:stop], sin[:, start:stop], mask, cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-6)
    assert cache.get_seq_length() == 6
    kept = cache.select(torch.tensor([1]))
    assert kept.keys[0].shape[0] == 1 and torch.equal(kept.keys[0][0], cache.keys[0][1])


def test_attention_mask_semantics():
    mask = build_attention_mask(torch.tensor([[0, 1, 1]]), 2, 1, torch.device("cpu"))
    assert mask.shape == (1, 1, 2, 3)
    # query at absolute position 1 sees key 1 only (key 0 is padding), query 2 sees keys 1 and 2
    assert mask[0, 0].tolist() == [[False, True, False], [False, True, True]]
    assert build_attention_mask(None, 4, 0, torch.device("cpu")) is None


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_dense_ffn_matches_formula(activation):
    torch.manual_seed(5)
    ffn = DenseFFN(8, 16, activation)
    x = torch.randn(3, 8)
    if activation == "swiglu":
        ref = (F.silu(x @ ffn.gate_proj.weight.T) * (x @ ffn.up_proj.weight.T)) @ ffn.down_proj.weight.T
    else:
        h = x @ ffn.up_proj.weight.T
        ref = (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ ffn.down_proj.weight.T
    torch.testing.assert_close(ffn(x), ref, rtol=1e-5, atol=1e-6)


def test_decoder_block_is_prenorm_residual():
    torch.manual_seed(6)
    attn = Attention(16, num_heads=2)
    ffn = DenseFFN(16, 32)
    blk = DecoderBlock(attn, ffn, 16, is_moe=False)
    x = torch.randn(1, 4, 16)
    cos, sin = RotaryEmbedding(8)(torch.arange(4)[None], x.dtype)
    y, decision = blk(x, cos, sin)
    h = x + attn(blk.input_layernorm(x), cos, sin)
    torch.testing.assert_close(y, h + ffn(blk.post_attention_layernorm(h)))
    assert decision is None


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(32, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="qk_norm"):
        Attention(32, num_heads=4, qk_norm="layer")
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="activation"):
        DenseFFN(4, 8, "relu")


def test_matches_hugging_face_functions():
    """Same rotary tables, rotation and RMSNorm as the transformers code our checkpoints come from."""
    olmoe = pytest.importorskip("transformers.models.olmoe.modeling_olmoe")
    torch.manual_seed(7)
    x = torch.randn(2, 3, 5, 16)
    pos = torch.tensor([[0, 1, 2, 3, 4], [2, 3, 4, 5, 6]])
    rope = RotaryEmbedding(16, theta=10000.0)
    cos, sin = rope(pos, x.dtype)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.int64).float() / 16))
    torch.testing.assert_close(rope.inv_freq, inv)
    q_ref, _ = olmoe.apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(apply_rotary(x, cos, sin), q_ref)
    hf_norm = olmoe.OlmoeRMSNorm(16, eps=1e-5)
    ours = RMSNorm(16, eps=1e-5)
    w = torch.rand(16) + 0.5
    hf_norm.weight.data.copy_(w)
    ours.weight.data.copy_(w)
    torch.testing.assert_close(ours(x), hf_norm(x), rtol=0, atol=0)


def test_decoding_calls_every_hooked_module_as_before():
    """A hook on any submodule of a model sees the same calls during cached decoding as plain calls give."""
    from moe_lab.inference import generate
    from moe_lab.models import MoEModel

    torch.manual_seed(0)
    model = MoEModel.from_preset("tiny").eval()
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(
                lambda m, a, o, name=name: counts.__setitem__(name, counts.get(name, 0) + 1)
            )
    out = generate(model, torch.randint(0, model.config.vocab_size, (2, 5)), max_new_tokens=4)
    assert out.sequences.shape == (2, 9)
    layers = model.config.num_layers
    assert counts["norm"] == 4 and counts["embed_tokens"] == 4 and counts["rotary"] == 4
    for i in range(layers):
        assert counts[f"layers.{i}"] == 4
        assert (
            counts[f"layers.{i}.input_layernorm"] == 4 and counts[f"layers.{i}.post_attention_layernorm"] == 4
        )
        assert counts[f"layers.{i}.self_attn"] == 4 and counts[f"layers.{i}.self_attn.o_proj"] == 4
        assert counts[f"layers.{i}.mlp"] == 4


def test_rotary_span_is_the_formula_bit_for_bit():
    rot = RotaryEmbedding(32, theta=500000.0)
    for start, length in [
        (0, 1),
        (5, 3),
        (63, 1),
        (64, 10),
        (300, 1),
        (0, 700),
    ]:  # grows past 64, then 128...
        for dtype in (torch.float32, torch.bfloat16):
            cos, sin = rot.span(start, length, dtype)
            ref_cos, ref_sin = rot(torch.arange(start, start + length)[None], dtype)
            assert cos.dtype == dtype and torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])
    rot.theta = 10000.0
    rot.reset_parameters()  # a new inv_freq: the table is rebuilt
    cos, _ = rot.span(7, 2, torch.float32)
    assert torch.equal(cos, rot(torch.tensor([[7, 8]]), torch.float32)[0][0])


def test_decoding_with_the_rotary_span_equals_the_formula():
    """Decoding (no mask, no autograd) slices the rotary table; a hook on the rotary module forces the
    formula: the logits are identical."""
    from moe_lab.models import MoEModel

    torch.manual_seed(0)
    model = MoEModel.from_preset("tiny").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 6))

    def logits() -> torch.Tensor:
        with torch.no_grad():
            out = model(ids[:, :5], use_cache=True)
            return model(ids[:, 5:], kv_cache=out.kv_cache, use_cache=True).logits

    fast = logits()
    assert "_span_table" in model.rotary.__dict__
    handle = model.rotary.register_forward_hook(lambda *_: None)
    try:
        assert torch.equal(logits(), fast)
    finally:
        handle.remove()


def test_attention_refuses_a_hidden_size_its_heads_do_not_divide():
    with pytest.raises(ValueError, match=r"hidden_size \(30\) must be divisible by num_heads \(4\)"):
        Attention(30, 4)
    assert Attention(30, 4, head_dim=8).q_proj.out_features == 32  # an explicit head_dim is fine
