"""Set-up helpers of the trainer: seeding, device choice, config merging, model overrides, tokenizer files.

Example:
    >>> from moe_lab.train.config import TrainConfig
    >>> from moe_lab.train.setup import merge_train_kwargs
    >>> merge_train_kwargs(TrainConfig(), {"max_steps": 5}).max_steps
    5
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from moe_lab.config import atomic_write_text
from moe_lab.train.config import TrainConfig
from moe_lab.train.rundir import RunDir

__all__ = [
    "apply_model_overrides",
    "merge_train_kwargs",
    "resolve_device",
    "save_tokenizer",
    "seed_everything",
]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda' was requested but no CUDA device is available")
    return torch.device(name)


def merge_train_kwargs(cfg: TrainConfig, kwargs: dict[str, Any]) -> TrainConfig:
    """``cfg`` with keyword overrides (``max_steps=100``); unknown names are an error."""
    if not kwargs:
        return cfg
    data = cfg.to_dict()
    unknown = sorted(set(kwargs) - set(data))
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; see moe_lab.train.TrainConfig")
    data.update(kwargs)
    return TrainConfig.from_dict(data)


def apply_model_overrides(model: nn.Module, cfg: TrainConfig) -> None:
    """Train-config overrides of the model's loss coefficients and expert dropout."""
    mcfg = getattr(model, "config", None)
    if mcfg is None or not hasattr(mcfg, "to_dict"):
        return
    updates: dict[str, Any] = {}
    if cfg.aux_loss_coef is not None:
        updates["aux_loss_coef"] = cfg.aux_loss_coef
    if cfg.load_balancing != "auxiliary_loss":
        updates["aux_loss_coef"] = 0.0
    if cfg.router_z_loss_coef is not None:
        updates["z_loss_coef"] = cfg.router_z_loss_coef
    if cfg.expert_dropout is not None:
        updates["expert_dropout"] = cfg.expert_dropout
        for module in model.modules():
            m: Any = module
            drop = getattr(m, "expert_dropout", None)
            if isinstance(drop, float):
                m.expert_dropout = cfg.expert_dropout
            elif isinstance(drop, nn.Dropout):
                drop.p = cfg.expert_dropout
    changed = {k: v for k, v in updates.items() if getattr(mcfg, k, None) != v}
    if changed:
        model.config = type(mcfg)(**{**mcfg.to_dict(), **changed})
    if cfg.load_balancing == "aux_free_bias":
        moe_layers: Any = getattr(model, "moe_layers", None)
        layers = moe_layers() if callable(moe_layers) else []
        if not any(callable(getattr(getattr(m, "router", None), "update_bias", None)) for m in layers):
            raise ValueError(
                "train.load_balancing='aux_free_bias' needs routers with an expert bias "
                "(model.router_type: sigmoid_bias)"
            )


def save_tokenizer(tokenizer: Any, run_dir: RunDir) -> None:
    """Write the tokenizer into a run/model folder as ``tokenizer.json`` (``tokenizer.txt`` = its name
    when it cannot save itself, e.g. ``byte``)."""
    save = getattr(tokenizer, "save", None)
    if callable(save):
        save(str(run_dir.path))
        return
    name = getattr(tokenizer, "name", None)
    if not isinstance(name, str):
        raise ValueError(
            f"cannot save tokenizer of type {type(tokenizer).__name__} (no save(directory) or name)"
        )
    atomic_write_text(run_dir.tokenizer_name_path, name + "\n")


def model_config_dict(model: nn.Module) -> dict[str, Any] | None:
    """The model's config as a plain dict (None for a model without a ``config``)."""
    cfg: Any = getattr(model, "config", None)
    return cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else None


def check_seq_len(model: nn.Module, dataset: Any, name: str) -> None:
    """A clear error when the dataset's sequences are longer than ``model.max_seq_len``."""
    from moe_lab.train.batches import is_indexable

    max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    if not is_indexable(dataset):
        return
    item = dataset[0]
    ids = item["input_ids"] if isinstance(item, dict) else item
    if max_len is not None and int(ids.shape[-1]) > max_len:
        raise ValueError(
            f"{name}: sequences have {int(ids.shape[-1])} tokens but model.max_seq_len is {max_len}; "
            "use a shorter data.seq_len or a larger model.max_seq_len"
        )


def total_steps(cfg: TrainConfig, iterator: Any) -> int:
    """``max_steps`` and/or the steps of ``num_epochs`` (whichever is smaller; neither = one epoch)."""
    if not hasattr(iterator, "batches_per_epoch"):  # streaming: the length is unknown
        if cfg.max_steps is None:
            raise ValueError("streaming data (data.streaming: true) needs train.max_steps")
        return int(cfg.max_steps)
    per_epoch = iterator.batches_per_epoch / cfg.grad_accum_steps
    steps = []
    if cfg.max_steps is not None:
        steps.append(cfg.max_steps)
    if cfg.num_epochs is not None or cfg.max_steps is None:
        steps.append(max(1, math.ceil((cfg.num_epochs or 1.0) * per_epoch)))
    return min(steps)
