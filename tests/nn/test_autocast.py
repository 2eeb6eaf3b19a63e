"""``torch.autocast`` on CPU: the routed experts run in the autocast dtype (they are not on autocast's cast
lists), attention keeps float32 SDPA in training, and the numbers stay close to float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_lab.models import MoEModel
from moe_lab.nn import MoELayer
from moe_lab.nn.experts import Experts
from moe_lab.nn.router import ExpertChoiceRouter, SigmoidBiasRouter, SwitchRouter, TopKRouter
from moe_lab.nn.transformer import Attention, RotaryEmbedding


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


def test_routers_decide_in_float32_under_autocast() -> None:
    torch.manual_seed(3)
    x = torch.randn(12, 16)
    for router in (
        TopKRouter(16, 8, 2),
        SwitchRouter(16, 4),
        ExpertChoiceRouter(16, 4, 2),
        SigmoidBiasRouter(16, 8, 2),
    ):
        ref = router(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = router(x)
        assert got.router_logits.dtype == torch.float32, type(router).__name__
        assert torch.equal(got.router_logits, ref.router_logits), type(router).__name__
        assert torch.equal(got.expert_indices, ref.expert_indices), type(router).__name__


def test_moe_layer_experts_run_in_the_autocast_dtype(monkeypatch) -> None:
    torch.manual_seed(0)
    layer = MoELayer(32, 64, 8, 2)
    x = torch.randn(2, 40, 32)
    g = torch.randn(2, 40, 32)

    def run(autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, _ = layer(x)
        (y.float() * g).sum().backward()
        return y, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}

    ref_y, ref_grads = run(False)
    dtypes: list[torch.dtype] = []
    forward, forward_capacity = Experts.forward, Experts.forward_capacity

    def spy(self, x_ND, counts, impl="auto"):
        dtypes.append(x_ND.dtype)
        return forward(self, x_ND, counts, impl)

    def spy_capacity(self, x_ECD):  # the batched layout (several CPU threads, small blocks)
        dtypes.append(x_ECD.dtype)
        return forward_capacity(self, x_ECD)

    monkeypatch.setattr(Experts, "forward", spy)
    monkeypatch.setattr(Experts, "forward_capacity", spy_capacity)
    y, grads = run(True)
    assert dtypes == [torch.bfloat16] and y.dtype == torch.bfloat16
    assert _rel(y, ref_y) < 0.03
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():  # float32 master weights get float32 gradients
        assert grad.dtype == torch.float32, name
        assert _rel(grad, ref_grads[name]) < 0.05, name


def test_attention_keeps_float32_sdpa_in_cpu_autocast_training(monkeypatch) -> None:
    torch.manual_seed(1)
    attn = Attention(32, 4, 2)
    rotary = RotaryEmbedding(8)
    x = torch.randn(2, 10, 32, requires_grad=True)
    cos, sin = rotary(torch.arange(10).expand(2, 10), torch.float32)
    ref = attn(x, cos, sin)
    seen: list[tuple[torch.dtype, ...]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, cos, sin)
        with torch.no_grad():  # inference: SDPA stays in bfloat16 (its forward is the faster one)
            attn(x, cos, sin)
    assert seen[0] == (torch.float32,) * 3 and torch.bfloat16 in seen[1]
    assert out.dtype == torch.bfloat16 and _rel(out, ref) < 0.03
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_tiny_model_training_step_under_autocast_is_close_to_float32() -> None:
    torch.manual_seed(2)
    model = MoEModel.from_preset("tiny").train()
    ids = torch.randint(0, model.config.vocab_size, (2, 48))
    ref = model(ids, labels=ids)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) < 0.02 * ref.loss.item()
    for name, p in model.named_parameters():
        if name in ref_grads:
            assert p.grad is not None and p.grad.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all(), name
            # cosine similarity: bfloat16 rounding changes magnitudes a little, not directions
            cos = F.cosine_similarity(p.grad.flatten(), ref_grads[name].flatten(), dim=0)
            assert float(cos) > 0.98, name
