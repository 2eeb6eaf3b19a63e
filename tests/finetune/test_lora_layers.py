"""The fused LoRA product and the LoRA layers against slow obvious references (outputs and every gradient)."""

from __future__ import annotations

import copy

import pytest
import torch

from moe_lab.finetune import lora_layers
from moe_lab.finetune.lora import LoRAConfig, apply_lora
from moe_lab.finetune.lora_layers import LoRAExperts, LoRALinear, lora_matmul
from moe_lab.models import MoEModel
from moe_lab.nn.experts import Experts

COUNTS = [3, 0, 5, 4]  # one expert without rows


def _reference(x, xd, ws, a, b, scale, counts):  # type: ignore[no-untyped-def]
    """Per group: x @ w_k[e] + scale * (xd @ A[e]) @ B[e][:, cols_k], from plain autograd ops."""
    xd = x if xd is None else xd
    cols = [w.shape[2] for w in ws]
    outs: list[list[torch.Tensor]] = [[] for _ in ws]
    for e, (xe, xde) in enumerate(zip(x.split(counts), xd.split(counts))):
        ae, be = (a[e], b[e]) if a.dim() == 3 else (a, b)
        upd = ((xde @ ae) @ be * scale).split(cols, dim=1)
        for k, w in enumerate(ws):
            outs[k].append(xe @ w[e] + upd[k])
    return [torch.cat(o) for o in outs]


def _leaves(*ts: torch.Tensor | None, grad: tuple[bool, ...]) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().clone().requires_grad_(g) for t, g in zip(ts, grad)]


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("expert_wise", [True, False])
@pytest.mark.parametrize("n_weights", [1, 2])
@pytest.mark.parametrize("dropout_input", [False, True])
@pytest.mark.parametrize("train_base", [False, True])
def test_lora_matmul_matches_reference(
    impl: str, expert_wise: bool, n_weights: int, dropout_input: bool, train_base: bool
) -> None:
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")
    g = torch.Generator().manual_seed(0)
    n, x_dim, r, e = sum(COUNTS), 16, 4, len(COUNTS)
    y_dims = [8, 12][:n_weights]
    x = torch.randn(n, x_dim, generator=g)
    xd = torch.randn(n, x_dim, generator=g) if dropout_input else None
    ws = [torch.randn(e, x_dim, y, generator=g) for y in y_dims]
    lead = (e,) if expert_wise else ()
    a = torch.randn(*lead, x_dim, r, generator=g)
    b = torch.randn(*lead, r, sum(y_dims), generator=g)
    grads = [torch.randn(n, y, generator=g) for y in y_dims]

    flags = (True, True, True, True, *([train_base] * n_weights))
    mine = _leaves(x, xd, a, b, *ws, grad=flags)
    ref = _leaves(x, xd, a, b, *ws, grad=flags)
    got = lora_matmul(mine[0], mine[1], mine[4:], mine[2], mine[3], 0.7, COUNTS, None, impl)  # type: ignore[arg-type]
    want = _reference(ref[0], ref[1], ref[4:], ref[2], ref[3], 0.7, COUNTS)
    for y, w in zip(got, want):
        torch.testing.assert_close(y, w, rtol=1e-5, atol=1e-5)
    torch.autograd.backward(list(got), grads)
    torch.autograd.backward(want, grads)
    for i, (p, q) in enumerate(zip(mine, ref)):
        if p is None:
            continue
        assert q is not None
        if not p.requires_grad:
            assert p.grad is None
            continue
        assert p.grad is not None and q.grad is not None, i
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)


def test_grouped_small_products_match_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator variant (rank-r products through _grouped_mm) gives the same numbers on CPU."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")
    g = torch.Generator().manual_seed(1)
    n = sum(COUNTS)
    x = torch.randn(n, 16, generator=g)
    ws = [torch.randn(4, 16, 8, generator=g), torch.randn(4, 16, 8, generator=g)]
    a, b = torch.randn(4, 16, 4, generator=g), torch.randn(4, 4, 16, generator=g)
    gy = [torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)]
    results = []
    for grouped in (False, True):
        monkeypatch.setattr(lora_layers, "_grouped_small", lambda *args, _g=grouped: _g)
        xs, aa, bb = (t.clone().requires_grad_() for t in (x, a, b))
        ys = lora_matmul(xs, None, ws, aa, bb, 2.0, COUNTS, None, "grouped_mm")
        torch.autograd.backward(list(ys), gy)
        results.append([*ys, xs.grad, aa.grad, bb.grad])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_gradients(bias: bool) -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10, bias=bias)
    layer = LoRALinear(base, rank=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 12, requires_grad=True)
    y = layer(x)
    # reference: the merged weight as a function of A and B, so autograd differentiates through it
    w = base.weight + layer.scale * layer.lora_B @ layer.lora_A
    x_ref = x.detach().clone().requires_grad_()
    want = torch.nn.functional.linear(x_ref, w, base.bias)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    params = [layer.lora_A, layer.lora_B, base.weight, *([base.bias] if bias else [])]
    got = torch.autograd.grad(y, [x, *params], gy)
    ref = torch.autograd.grad(want, [x_ref, *params], gy)
    for p, q in zip(got, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("expert_wise", [True, False])
@pytest.mark.parametrize("impl", ["loop", "grouped_mm", "capacity"])
def test_lora_experts_gradients(fused: bool, expert_wise: bool, impl: str) -> None:
    """Outputs and A/B gradients equal a merged-weight reference, ``W + scale * A @ B`` per expert."""
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")
    torch.manual_seed(0)
    base = Experts(4, 16, 24)
    for p in base.parameters():
        p.requires_grad_(False)
    lora = LoRAExperts(base, 4, 8.0, 0.0, expert_wise, ["w1", "w2", "w3"], fused_gate_up=fused)
    assert sorted(lora.lora_A) == (["w13", "w2"] if fused else ["w1", "w2", "w3"])
    with torch.no_grad():
        for t in lora.lora_B.values():
            t.normal_(std=0.3)
    merged = copy.deepcopy(base)
    adapters = list(lora.lora_A.values()) + list(lora.lora_B.values())
    if impl == "capacity":
        x = torch.randn(4, 5, 16, requires_grad=True)
        y = lora.forward_capacity(x)
    else:
        x = torch.randn(sum(COUNTS), 16, requires_grad=True)
        y = lora(x, COUNTS, impl)
    x_ref = x.detach().clone().requires_grad_()
    for key, members in lora.groups.items():  # rebind merged weights as differentiable functions of A, B
        ws = [getattr(base, "w2_EFD" if m == "w2" else f"{m}_EDF") for m in members]
        for m, w, d in zip(members, ws, lora.delta(key).split([w.shape[2] for w in ws], dim=-1)):
            name = "w2_EFD" if m == "w2" else f"{m}_EDF"
            del merged._parameters[name]
            setattr(merged, name, w + d)
    want = merged.forward_capacity(x_ref) if impl == "capacity" else merged(x_ref, COUNTS, "loop")
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *adapters], gy)
    ref = torch.autograd.grad(want, [x_ref, *adapters], gy)
    for p, q in zip(got, ref):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_fused_gate_up_has_peft_parameter_count(tiny_model: MoEModel) -> None:
    """rank * (D + 2F) per expert for gate/up together, rank * (F + D) for down, as peft's gate_up_proj."""
    cfg = tiny_model.config
    e, d, f, r = cfg.num_experts, cfg.hidden_size, cfg.ffn_hidden_size, 4
    sep = apply_lora(copy.deepcopy(tiny_model), LoRAConfig(rank=r, target_modules=["experts"]))
    fused = apply_lora(tiny_model, LoRAConfig(rank=r, target_modules=["experts"], fused_gate_up=True))
    per_layer = e * r * ((d + 2 * f) + (f + d))
    assert fused.num_trainable() == cfg.num_layers * per_layer
    assert sep.num_trainable() - fused.num_trainable() == cfg.num_layers * e * r * d  # the second A
    shapes = {k: tuple(v.shape) for k, v in fused.adapter_state_dict().items()}
    assert shapes["layers.0.mlp.experts.lora_A.w13"] == (e, d, r)
    assert shapes["layers.0.mlp.experts.lora_B.w13"] == (e, r, 2 * f)


def test_gelu_experts_ignore_fused_gate_up() -> None:
    lora = LoRAExperts(Experts(2, 8, 16, activation="gelu"), 2, 4.0, 0.0, True, ["w1", "w2", "w3"], True)
    assert sorted(lora.lora_A) == ["w1", "w2"]
    x = torch.randn(5, 8)
    assert lora(x, [2, 3], "loop").shape == (5, 8)
