"""Train-config overrides of the model: router z-loss coefficient and expert dropout reach the model."""

from __future__ import annotations

import torch

from moe_lab.models import MoEModel
from moe_lab.nn.losses import router_z_loss
from moe_lab.train import TrainConfig
from moe_lab.train.setup import apply_model_overrides


def test_router_z_loss_coef_override_scales_the_models_z_loss() -> None:
    torch.manual_seed(0)
    model = MoEModel.from_preset("tiny", z_loss_coef=0.001)
    ids = torch.randint(0, 256, (2, 16))
    apply_model_overrides(model, TrainConfig(router_z_loss_coef=0.05))
    assert model.config.z_loss_coef == 0.05
    out = model(ids)
    expected = 0.05 * sum(router_z_loss(d) for d in out.routing)
    assert torch.allclose(out.z_loss, expected, rtol=1e-6)


def test_expert_dropout_override_reaches_every_expert_module() -> None:
    torch.manual_seed(0)
    model = MoEModel.from_preset("tiny")
    assert model.config.expert_dropout == 0.0
    apply_model_overrides(model, TrainConfig(expert_dropout=0.5))
    assert model.config.expert_dropout == 0.5
    experts = [layer.experts for layer in model.moe_layers()]
    assert experts and all(e.expert_dropout == 0.5 for e in experts)
    # in training the expert outputs now vary from call to call (dropout), in eval they do not
    ids = torch.randint(0, 256, (2, 16))
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
