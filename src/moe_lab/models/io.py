"""moe-lab's own model directory format: ``config.yaml`` (the ModelConfig) + ``model.safetensors``.

Writes go to a temporary sibling directory that is renamed into place, so a reader never sees a half-written
model. A tied output projection is stored once (under ``embed_tokens.weight``). Reading accepts
``model_config.json`` instead of ``config.yaml``; a ``model:`` section inside ``config.yaml`` (a run config)
is accepted too.

Example:
    >>> # model.save_pretrained("out/tiny"); MoEModel.load("out/tiny")
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from moe_lab.config import ConfigError
from moe_lab.models.config import ModelConfig

if TYPE_CHECKING:
    from moe_lab.models.model import MoEModel

__all__ = [
    "WEIGHTS_NAME",
    "assign_state",
    "check_state_matches",
    "load_model_config",
    "load_model_dir",
    "save_model_dir",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
JSON_CONFIG_NAME = "model_config.json"


def _state_to_save(model: MoEModel) -> dict[str, Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_model_dir(model: MoEModel, directory: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``config.yaml`` and ``model.safetensors`` (plus ``extra_files``: name -> text) into
    ``directory`` atomically; returns the path."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model.config.to_yaml(tmp / CONFIG_NAME)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        save_file(_state_to_save(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "moe_lab": "1"})
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_model_config(directory: str | Path) -> ModelConfig:
    """Read the ModelConfig of a model directory (``config.yaml`` or ``model_config.json``)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory not found: {d}")
    data: Any
    if (d / CONFIG_NAME).is_file():
        data = yaml.safe_load((d / CONFIG_NAME).read_text(encoding="utf-8"))
        source = d / CONFIG_NAME
    elif (d / JSON_CONFIG_NAME).is_file():
        data = json.loads((d / JSON_CONFIG_NAME).read_text(encoding="utf-8"))
        source = d / JSON_CONFIG_NAME
    else:
        raise FileNotFoundError(
            f"{d}: no {CONFIG_NAME} or {JSON_CONFIG_NAME} (is this a moe-lab model directory?)"
        )
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_model_dir(directory: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Read the config and the safetensors state dict (the tied output projection restored)."""
    d = Path(directory)
    cfg = load_model_config(d)
    weights = d / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{d}: missing {WEIGHTS_NAME}")
    state = load_file(str(weights))
    if cfg.tie_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return cfg, state


def assign_state(model: MoEModel, state: dict[str, Tensor], where: str) -> MoEModel:
    """Put ``state`` into a ``model`` built on the meta device (no random init of weights about to be
    overwritten): the tensors are assigned, not copied; a tied output projection is tied again; rotary
    tables (not in the state dict) are recomputed on the CPU. ``where`` names the source in errors.

    Example:
        >>> import torch
        >>> from moe_lab.models import MoEModel
        >>> src = MoEModel.from_preset("tiny")
        >>> with torch.device("meta"):
        ...     empty = MoEModel(config=src.config)
        >>> m = assign_state(empty, src.state_dict(), "example")
        >>> torch.equal(m.embed_tokens.weight, src.embed_tokens.weight)
        True
    """
    from moe_lab.nn.huge_pages import advise_huge_pages
    from moe_lab.nn.transformer import RotaryEmbedding

    if model.config.tie_embeddings and "embed_tokens.weight" in state:
        state = {**state, "lm_head.weight": state["embed_tokens.weight"]}
    check_state_matches(model.state_dict(), state, where)
    model.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):  # non-persistent buffer: recompute off the meta device
            module.inv_freq = torch.empty(module.inv_freq.shape, dtype=torch.float32)
            module.reset_parameters()
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise ValueError(f"{where}: internal mapping error, tensors left unset: {on_meta[:5]}")
    advise_huge_pages(model)  # assign=True put the loaded tensors in place: large CPU ones to 2 MiB pages
    return model


def check_state_matches(own: dict[str, Tensor], state: dict[str, Tensor], where: str) -> None:
    """Raise a ValueError naming ``where`` unless ``state`` has exactly the keys and shapes of ``own``."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{where}: weights do not match the config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]})"
        )
