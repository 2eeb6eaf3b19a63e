"""MoEModel: shapes, loss, padding, layouts, caching, parameter counting, balancing hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_lab.models import DenseModel, ModelConfig, MoEModel
from moe_lab.nn.transformer import KVCache

TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=32)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return MoEModel(**{**TINY, "num_experts": 4, "experts_per_token": 2, **kw}).eval()


def test_forward_shapes_and_loss_composition():
    model = _model(aux_loss_coef=0.1, z_loss_coef=0.01)
    ids = torch.randint(0, 64, (3, 7))
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 7, 64)
    assert len(out.routing) == 2 and out.routing[0].expert_indices.shape == (21, 2)
    assert out.kv_cache is None
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + out.z_loss)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ref)
    from moe_lab.nn.losses import load_balancing_loss, router_z_loss

    torch.testing.assert_close(out.aux_loss, 0.1 * sum(load_balancing_loss(d) for d in out.routing))
    torch.testing.assert_close(out.z_loss, 0.01 * sum(router_z_loss(d) for d in out.routing))
    assert model(ids).loss is None


def test_ignored_labels_and_zero_coefficients():
    model = _model(aux_loss_coef=0.0, z_loss_coef=0.0)
    ids = torch.randint(0, 64, (2, 6))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, 3:5].reshape(-1, 64), ids[:, 4:6].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ref)
    assert float(out.aux_loss) == 0.0 and float(out.z_loss) == 0.0
    torch.testing.assert_close(out.loss, out.lm_loss)
    all_ignored = model(ids, labels=torch.full_like(ids, -100))
    assert float(all_ignored.lm_loss.detach()) == 0.0


@pytest.mark.parametrize("which", ["small-vocab", "tiny-preset"])
def test_tiny_model_overfits_one_batch(which):
    # loss below 0.1 x its start within a few hundred steps: a custom 64-token model and the `tiny` preset
    torch.manual_seed(0)
    if which == "tiny-preset":
        model = MoEModel.from_preset("tiny")
        ids = torch.randint(0, model.config.vocab_size, (4, 32))
    else:
        model = MoEModel(**{**TINY, "num_experts": 4, "experts_per_token": 2})
        ids = torch.randint(0, 64, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = last = None
    for _ in range(300):
        out = model(ids, labels=ids)
        last = float(out.lm_loss.detach())
        first = last if first is None else first
        if last < 0.1 * first:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert last < 0.1 * first, (first, last)


def test_aux_loss_is_coef_times_layers_at_perfect_balance():
    # uniform router probabilities (zero gates) make every layer's Switch loss exactly 1.0 whatever the
    # choices: the model's aux_loss is then aux_loss_coef x the number of MoE layers
    for coef in (0.01, 0.25):
        torch.manual_seed(0)
        model = MoEModel.from_preset("tiny", aux_loss_coef=coef, num_layers=3)  # train mode: losses on
        for layer in model.moe_layers():
            torch.nn.init.zeros_(layer.router.gate.weight)
        out = model(torch.randint(0, 256, (2, 16)))
        assert out.aux_loss.item() == pytest.approx(coef * 3, rel=1e-6)


def test_right_padding_does_not_change_real_logits():
    model = _model(1)
    ids = torch.randint(1, 64, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    out = model(padded, attention_mask=mask)
    torch.testing.assert_close(out.logits[:, :5], model(ids).logits, rtol=1e-5, atol=1e-5)
    assert out.routing[0].token_mask.tolist() == [True] * 5 + [False] * 3


def test_left_padded_batch_equals_unpadded_rows():
    model = _model(2)
    a, b = torch.randint(1, 64, (1, 6)), torch.randint(1, 64, (1, 3))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out = model(batch, attention_mask=mask)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits[0], model(a).logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[1, 3:], model(b).logits[0], rtol=1e-5, atol=1e-5)
    # padding positions are not targets
    labels = batch.clone()
    lm = model(batch, attention_mask=mask, labels=labels).lm_loss
    manual = torch.cat([out.logits[0, :5], out.logits[1, 3:5]])
    target = torch.cat([batch[0, 1:], batch[1, 4:]])
    torch.testing.assert_close(lm, F.cross_entropy(manual, target), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("left_pad", [0, 2])
def test_kv_cache_incremental_logits_equal_full(left_pad):
    model = _model(3, qk_norm="full")
    ids = torch.randint(1, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :left_pad] = 0
    full = model(ids, attention_mask=mask).logits
    out = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
    assert isinstance(out.kv_cache, KVCache) and out.kv_cache.get_seq_length() == 5
    pieces, cache = [out.logits], out.kv_cache
    for t in range(5, 9):
        step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache, use_cache=True)
        pieces.append(step.logits)
        cache = step.kv_cache
    inc = torch.cat(pieces, 1)
    keep = mask.bool()
    torch.testing.assert_close(inc[keep], full[keep], rtol=1e-5, atol=1e-5)


def test_moe_layer_layouts():
    cfg = ModelConfig(**TINY | {"num_layers": 6}, moe_layer_frequency=2, moe_layer_offset=1)
    assert cfg.moe_layer_indices() == [1, 3, 5]
    model = MoEModel(cfg)
    assert [blk.is_moe for blk in model.layers] == [False, True, False, True, False, True]
    assert len(model.moe_layers()) == 3 and len(model(torch.zeros(1, 3, dtype=torch.long)).routing) == 3
    assert ModelConfig(**TINY | {"num_layers": 6}, moe_layer_frequency=3).moe_layer_indices() == [0, 3]
    assert ModelConfig(**TINY | {"num_layers": 4}, moe_layers=[0, 2]).moe_layer_indices() == [0, 2]
    assert ModelConfig(**TINY, moe_layer_frequency=0).moe_layer_indices() == []
    assert ModelConfig(**TINY, num_experts=0).moe_layer_indices() == []


def test_tied_and_untied_embeddings():
    tied, untied = _model(tie_embeddings=True), _model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.num_params() - tied.num_params() == 64 * 32
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()


def test_one_expert_model_equals_dense_model():
    moe = _model(4, num_experts=1, experts_per_token=1)
    dense = DenseModel(**TINY, dense_ffn_hidden_size=32).eval()
    router_params = sum(layer.router.gate.weight.numel() for layer in moe.moe_layers())
    assert moe.num_active_params() == dense.num_params() + router_params
    assert moe.num_params() == moe.num_active_params()
    state = {}
    for k, v in moe.state_dict().items():
        if ".mlp.experts.w1_EDF" in k:
            state[k.replace("experts.w1_EDF", "gate_proj.weight")] = v[0].T
        elif ".mlp.experts.w3_EDF" in k:
            state[k.replace("experts.w3_EDF", "up_proj.weight")] = v[0].T
        elif ".mlp.experts.w2_EFD" in k:
            state[k.replace("experts.w2_EFD", "down_proj.weight")] = v[0].T
        elif ".mlp.router." not in k:
            state[k] = v
    dense.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 5))
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_active_params_and_flops_formula():
    model = _model(num_experts=4, experts_per_token=2, tie_embeddings=True)
    expert = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    assert model.num_active_params() == model.num_params() - expert // 2
    assert model.num_active_params(exclude_embeddings=True) == model.num_active_params() - 64 * 32
    norms = 32 * (2 * 2 + 1)  # two norms per block + the final norm
    matmul = model.num_active_params(exclude_embeddings=True) + 64 * 32 - norms  # tied head still multiplies
    assert model.flops_per_token(10) == 2 * matmul + 4 * 2 * 10 * 4 * 8


def test_update_router_biases_moves_biases_toward_balance():
    model = _model(router_type="sigmoid_bias", bias_update_rate=0.1)
    out = model(torch.randint(0, 64, (2, 8)))
    model.update_router_biases(out.routing)
    for layer, decision in zip(model.moe_layers(), out.routing):
        load = decision.tokens_per_expert.float()
        expected = 0.1 * torch.sign(load.mean() - load)
        torch.testing.assert_close(layer.router.expert_bias, expected)
    with pytest.raises(ValueError, match="MoE layers"):
        model.update_router_biases(out.routing[:1])


def test_task_ids_feed_router_inputs():
    model = _model(num_tasks=3)
    ids = torch.randint(0, 64, (2, 4))
    with pytest.raises(ValueError, match="task_ids"):
        model(ids)
    base = model(ids, task_ids=torch.tensor([0, 1])).routing[0].router_logits
    with torch.no_grad():
        model.task_embed.weight[1].normal_()
    moved = model(ids, task_ids=torch.tensor([0, 1])).routing[0].router_logits
    torch.testing.assert_close(moved[:4], base[:4])  # row 0 (task 0) unchanged
    assert not torch.allclose(moved[4:], base[4:])
    with pytest.raises(ValueError, match="num_tasks=0"):
        _model()(ids, task_ids=torch.tensor([0, 0]))


def test_gradient_checkpointing_gives_same_gradients():
    ids = torch.randint(0, 64, (2, 6))
    grads = []
    for ckpt in (False, True):
        model = _model(5).train()
        model.gradient_checkpointing = ckpt
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_input_errors_are_clear():
    model = _model(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(4, dtype=torch.long))


def test_from_pretrained_delegates_to_interop(monkeypatch):
    import sys
    import types

    from moe_lab.models import MixtralModel

    calls = []
    fake = types.ModuleType("moe_lab.interop")
    fake.load_pretrained = lambda path, family=None, **kw: calls.append((path, family)) or "model"
    monkeypatch.setitem(sys.modules, "moe_lab.interop", fake)
    assert MixtralModel.from_pretrained("some/dir") == "model"
    assert MoEModel.from_pretrained("other") == "model"
    assert calls == [("some/dir", "mixtral"), ("other", None)]


@pytest.mark.gpu
def test_runs_on_cuda():
    model = _model().cuda()
    ids = torch.randint(0, 64, (2, 8), device="cuda")
    out = model(ids, labels=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    assert out.logits.device.type == "cuda" and torch.isfinite(out.loss)
    out.loss.backward()


def test_config_forms():
    cfg = ModelConfig(**TINY)
    assert MoEModel(cfg).config is cfg
    assert MoEModel(cfg.to_dict()).config == cfg
    assert MoEModel(cfg, num_layers=1).config.num_layers == 1
    with pytest.raises(TypeError, match="ModelConfig"):
        MoEModel("tiny")  # type: ignore[arg-type]
    assert MoEModel(42).config.vocab_size == 42  # an int is the first field by position


def test_leading_fields_by_position():
    m = MoEModel(256, 64, 2, 4, 8, 2, "top_k", num_kv_heads=2)
    ref = MoEModel(
        vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_experts=8, experts_per_token=2,
        router_type="top_k", num_kv_heads=2,
    )  # fmt: skip
    assert m.config == ref.config
    with pytest.raises(TypeError, match="both by position and by keyword"):
        MoEModel(256, 64, vocab_size=128)
    with pytest.raises(TypeError, match="at most 7 positional fields"):
        MoEModel(256, 64, 2, 4, 8, 2, "top_k", 3)
    with pytest.raises(TypeError, match="further fields must be keywords"):
        MoEModel(m.config, 4)
