"""``data.seed`` sets the data order; ``train.seed`` does when it is not set."""

from __future__ import annotations

import torch

from moe_lab.models import MoEModel
from moe_lab.train import MoETrainer, RunConfig


def _first_step(data_seed: int | None, train_seed: int) -> tuple[int, float]:
    """(the batch iterator's seed, the loss of the first step)."""
    overrides = [f"train.seed={train_seed}", "train.max_steps=1", "train.batch_size=4"]
    if data_seed is not None:
        overrides.append(f"data.seed={data_seed}")
    cfg = RunConfig.load(preset="tiny", overrides=overrides)
    # 64 different sequences: another order gives another first batch
    data = (torch.arange(64 * 16).view(64, 16) * 7 + torch.arange(64)[:, None] * 13) % 200
    torch.manual_seed(train_seed)
    trainer = MoETrainer(MoEModel(cfg.model), cfg.train, run_config=cfg, console=False)
    result = trainer.train(data)
    return trainer._iter.seed, float(result.final_loss)


def test_data_seed_sets_the_order_train_seed_otherwise() -> None:
    unset = _first_step(None, 5)
    assert unset[0] == 5  # data.seed unset: train.seed orders the data
    assert _first_step(5, 5) == unset  # the same seed given explicitly: the same run
    other = _first_step(7, 5)
    assert other[0] == 7
    assert other[1] != unset[1]  # same weights (train.seed), another first batch
