"""ONNX export checked with onnxruntime, the static MoE formulation, and torch.compile."""

from __future__ import annotations

import pytest
import torch

from moe_lab.inference.export import compile_model, export_onnx, static_moe, verify_onnx
from moe_lab.models import MoEModel


def _model(**kw):
    torch.manual_seed(0)
    fields = dict(
        vocab_size=96,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_experts=4,
        experts_per_token=2,
        ffn_hidden_size=32,
        max_seq_len=64,
    )
    fields.update(kw)
    m = MoEModel(**fields).eval()
    for layer in m.moe_layers():
        torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
    return m


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"norm_topk_prob": False, "qk_norm": "full"},
        {"router_type": "sigmoid_bias"},
        {"num_shared_experts": 1, "shared_expert_gate": True, "activation": "gelu"},
    ],
)
def test_static_moe_equals_dispatch(kw):
    m = _model(**kw)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        ref = m(ids).logits
        with static_moe(m):
            out = m(ids).logits
        again = m(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, ref)  # the original layers are back


@pytest.mark.slow
def test_onnx_export_matches_pytorch(tmp_path):
    m = _model()
    path = export_onnx(m, tmp_path / "m.onnx")
    assert path.stat().st_size > 0
    # dynamic batch and sequence: other shapes than the example
    for shape in [(1, 5), (3, 11), (2, 40)]:
        ids = torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(shape[1]))
        assert verify_onnx(m, path, ids) < 1e-4


def test_export_rejects_capacity_and_expert_choice(tmp_path):
    m = _model(router_type="switch", experts_per_token=1, capacity_factor=1.0, eval_capacity_factor=1.0)
    with pytest.raises(ValueError, match="dropless routing"), static_moe(m):
        pass
    m = _model(router_type="expert_choice")
    with pytest.raises(ValueError, match="expert_choice"), static_moe(m):
        pass


@pytest.mark.slow
def test_compiled_model_matches_eager():
    m = _model()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = m(ids).logits
        out = compile_model(m)(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
