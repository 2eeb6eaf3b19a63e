"""LoRA on attention and stacked experts: equals the merged-weight reference, save/load, merge."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from moe_lab.finetune.lora import LoRAConfig, LoRAExperts, LoRALinear, apply_lora, load_adapter
from moe_lab.models import MoEModel
from moe_lab.nn.experts import Experts


def _randomise_adapters(lora, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lora.adapter_state_dict().values():
            t.copy_(0.2 * torch.randn(t.shape, generator=g))


def _reference_model(base: MoEModel, lora) -> MoEModel:
    """The slow obvious reference: a plain model whose weights are W + scale * A @ B, expert by expert."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for path, mod in lora.adapters.items():
            target = ref.get_submodule(path)
            if isinstance(mod, LoRALinear):
                target.weight += mod.scale * (mod.lora_B @ mod.lora_A)
                continue
            assert isinstance(target, Experts)
            for key in mod.lora_A:
                members = ["w1", "w3"] if key == "w13" else [key]  # w13: B's columns are w1's, then w3's
                col = 0
                for name in members:
                    w = getattr(target, "w2_EFD" if name == "w2" else f"{name}_EDF")
                    cols = slice(col, col + w.shape[2])
                    col += w.shape[2]
                    for e in range(w.shape[0]):
                        a = mod.lora_A[key][e] if mod.expert_wise else mod.lora_A[key]
                        b = mod.lora_B[key][e] if mod.expert_wise else mod.lora_B[key]
                        w[e] += mod.scale * (a @ b[:, cols])
    return ref


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("expert_wise", [True, False])
@pytest.mark.parametrize("impl", ["loop", "grouped_mm", "capacity"])
def test_lora_equals_merged_weight_reference(tiny_model, expert_wise: bool, impl: str, fused: bool) -> None:
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")
    extra = {"capacity_factor": 8.0, "eval_capacity_factor": 8.0} if impl == "capacity" else {}
    base = MoEModel(tiny_model.config, impl=impl, **extra).eval()
    base.load_state_dict(tiny_model.state_dict())
    model = copy.deepcopy(base)
    cfg = LoRAConfig(
        rank=4,
        alpha=8,
        target_modules=["attention", "experts", "shared_experts"],
        expert_wise_adaptation=expert_wise,
        fused_gate_up=fused,
    )
    lora = apply_lora(model, cfg)
    _randomise_adapters(lora)
    ref = _reference_model(base, lora)
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        got, want = model(ids), ref(ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    for d1, d2 in zip(got.routing, want.routing):
        assert torch.equal(d1.expert_indices, d2.expert_indices)
    shapes = {k: tuple(v.shape) for k, v in lora.adapter_state_dict().items()}
    a1 = shapes["layers.0.mlp.experts.lora_A.w13" if fused else "layers.0.mlp.experts.lora_A.w1"]
    assert a1 == ((4, 32, 4) if expert_wise else (32, 4))
    assert shapes["layers.0.mlp.experts.lora_B.w2"] == ((4, 4, 32) if expert_wise else (4, 32))
    if fused:
        assert "layers.0.mlp.experts.lora_A.w3" not in shapes
        assert shapes["layers.0.mlp.experts.lora_B.w13"] == ((4, 4, 64) if expert_wise else (4, 64))


def test_odd_rank_and_gradients(tiny_model) -> None:
    lora = apply_lora(tiny_model, LoRAConfig(rank=3, alpha=3, target_modules=["experts", "q_proj"]))
    _randomise_adapters(lora)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    ids = torch.randint(0, 96, (2, 8))
    tiny_model(ids, labels=ids).loss.backward()
    for n, p in tiny_model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    assert all(float(p.grad.abs().sum()) > 0 for n, p in tiny_model.named_parameters() if n in trainable)


@pytest.mark.parametrize("fused", [False, True])
def test_fresh_adapter_is_a_no_op_and_merge(tiny_model, fused: bool) -> None:
    tiny_model.eval()
    ids = torch.randint(0, 96, (2, 9))
    before = tiny_model(ids).logits
    lora = apply_lora(tiny_model, LoRAConfig(rank=4, dropout=0.1, fused_gate_up=fused))
    assert torch.equal(tiny_model(ids).logits, before)  # B starts at zero
    _randomise_adapters(lora, seed=3)
    unmerged = tiny_model(ids).logits
    assert not torch.allclose(unmerged, before)
    merged_model = lora.merge()
    assert not any(isinstance(m, (LoRALinear, LoRAExperts)) for m in merged_model.modules())
    torch.testing.assert_close(merged_model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert set(merged_model.state_dict()) == set(MoEModel(tiny_model.config).state_dict())


def test_dropout_only_in_training(tiny_model) -> None:
    lora = apply_lora(tiny_model, LoRAConfig(rank=4, dropout=0.5))
    _randomise_adapters(lora)
    ids = torch.randint(0, 96, (1, 8))
    tiny_model.eval()
    a, b = tiny_model(ids).logits, tiny_model(ids).logits
    assert torch.equal(a, b)
    tiny_model.train()
    torch.manual_seed(0)
    assert not torch.allclose(tiny_model(ids).logits, a)


@pytest.mark.parametrize("fused", [False, True])
def test_save_and_load_adapter(tiny_model, tmp_path: Path, fused: bool) -> None:
    base_state = copy.deepcopy(tiny_model.state_dict())
    lora = apply_lora(
        tiny_model,
        LoRAConfig(rank=4, target_modules=["attention", "experts"], train_routers=True, fused_gate_up=fused),
    )
    assert tiny_model.layers[0].mlp.router.gate.weight.requires_grad
    _randomise_adapters(lora, seed=5)
    lora.save_adapter(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    ids = torch.randint(0, 96, (2, 7))
    tiny_model.eval()
    want = tiny_model(ids).logits

    fresh = MoEModel(tiny_model.config).eval()
    fresh.load_state_dict(base_state)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh(ids).logits, want)
    assert loaded.config.rank == 4

    other = MoEModel(tiny_model.config, hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match=r"tensor 'layers\.0\.self_attn\.q_proj\.lora_A' has shape"):
        load_adapter(other, tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_adapter(MoEModel(tiny_model.config), tmp_path)


def test_bad_targets(tiny_model) -> None:
    with pytest.raises(ValueError, match="unknown target"):
        LoRAConfig(target_modules=["mlp"])
    dense = MoEModel(vocab_size=96, hidden_size=32, num_heads=4, num_experts=0)
    with pytest.raises(ValueError, match="no matching module"):
        apply_lora(dense, LoRAConfig(target_modules=["experts"]))


def test_adapters_train_under_bf16_autocast(tiny_model) -> None:
    # every LoRA product in one dtype: before, float32 and bfloat16 operands met in an in-place addmm
    lora = apply_lora(tiny_model, LoRAConfig(rank=4, alpha=8, target_modules=["attention", "experts"]))
    _randomise_adapters(lora)
    ids = torch.randint(0, 96, (2, 24))
    ref = tiny_model(ids, labels=ids).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
    tiny_model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tiny_model(ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - ref.item()) < 0.02 * ref.item()
    assert ref_grads and all(".lora_" in n for n in ref_grads)
    for n, p in tiny_model.named_parameters():
        if n in ref_grads:
            assert p.grad is not None and p.grad.dtype == torch.float32, n
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), ref_grads[n].flatten(), dim=0)
            assert float(cos) > 0.97, n
