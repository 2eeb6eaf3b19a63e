"""Configuration of a training run: :class:`TrainConfig` and the whole-run :class:`RunConfig`.

A run is described by four sections, each a validated :class:`moe_lab.config.Config`:
``model`` (:class:`moe_lab.models.ModelConfig`), ``data`` (:class:`moe_lab.data.DataConfig`),
``train`` (:class:`TrainConfig`) and ``parallel`` (:class:`moe_lab.parallel.ParallelConfig`, used when
the run is launched on several processes). The run directory keeps the exact ``RunConfig`` that ran as
``config.yaml``.

Example:
    >>> from moe_lab.train.config import RunConfig
    >>> cfg = RunConfig.load(preset="tiny", overrides=["train.max_steps=100", "model.num_experts=16"])
    >>> cfg.train.max_steps, cfg.model.num_experts
    (100, 16)
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from moe_lab.config import Config, ConfigError, yaml_error_text
from moe_lab.data import DataConfig
from moe_lab.models import ModelConfig, get_preset
from moe_lab.parallel.config import ParallelConfig

__all__ = ["PRESET_RUN_DEFAULTS", "RunConfig", "TrainConfig"]


class TrainConfig(Config):
    """How to train: steps, batch, optimiser, schedule, precision, evaluation, checkpoints."""

    max_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps to run. With ``num_epochs`` also set, training stops at whichever comes first;
    with neither, one epoch."""
    num_epochs: float | None = Field(default=None, gt=0)
    """Passes over the training set (fractions allowed)."""
    batch_size: int = Field(default=16, ge=1)
    """Sequences per micro-batch, over all processes (each of W ranks takes batch_size / W of them)."""
    grad_accum_steps: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum_steps)."""
    learning_rate: float = Field(default=1e-3, gt=0)
    """Peak learning rate of every parameter except the routers."""
    router_learning_rate: float | None = Field(default=None, gt=0)
    """Peak learning rate of the router gates; None = same as ``learning_rate``."""
    weight_decay: float = Field(default=0.1, ge=0)
    """AdamW decoupled weight decay (never applied to norms, biases, embeddings, routers)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warm-up steps from 0 to the peak learning rate."""
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    """Decay after warm-up down to ``min_lr_ratio * peak``."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Final learning rate as a fraction of the peak (cosine and linear)."""
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value; None disables clipping."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """``bf16`` = bfloat16 autocast (CPU and CUDA) with fp32 master weights and optimizer state."""
    eval_every: int = Field(default=0, ge=0)
    """Evaluate on the validation set every N steps (0 = only at the end)."""
    eval_batches: int | None = Field(default=20, ge=1)
    """Validation batches per evaluation (None = the whole validation set)."""
    log_every: int = Field(default=10, ge=1)
    """Console log line every N steps (metrics.jsonl gets every step)."""
    checkpoint_every: int = Field(default=0, ge=0)
    """Write a checkpoint every N steps (0 = only the final one)."""
    keep_last_checkpoints: int = Field(default=2, ge=1)
    """Keep only the newest K checkpoints."""
    save_final_checkpoint: bool = True
    """Write a checkpoint when training ends."""
    load_balancing: Literal["auxiliary_loss", "aux_free_bias", "none"] = "auxiliary_loss"
    """``auxiliary_loss``: add the load-balancing loss; ``aux_free_bias``: no aux loss, update the
    routers' expert biases after each step (DeepSeek-V3 style); ``none``: no balancing."""
    aux_loss_coef: float | None = Field(default=None, ge=0)
    """Override the model's load-balancing loss coefficient (None = keep the model's)."""
    router_z_loss_coef: float | None = Field(default=None, ge=0)
    """Override the model's router z-loss coefficient (None = keep the model's)."""
    expert_dropout: float | None = Field(default=None, ge=0, lt=1)
    """Override the model's expert dropout (None = keep the model's)."""
    seed: int = 0
    """Seed of model init, dropout and (unless ``data.seed`` is set) the data order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` = CUDA when available, else CPU."""
    compile: bool = False
    """Wrap the model with ``torch.compile``."""
    num_threads: int | None = Field(default=None, ge=1)
    """``torch.set_num_threads`` for CPU training (None = torch's default)."""
    name: str | None = None
    """Run name: the run directory is ``<runs_dir>/<name>`` (None = a time-stamped name)."""
    runs_dir: str = "runs"
    """Folder holding run directories."""
    run_dir: str | None = None
    """Explicit run directory (overrides ``runs_dir``/``name``)."""
    early_stopping_patience: int | None = Field(default=None, ge=1)
    """Stop after this many evaluations without a better validation loss (None = never)."""
    early_stopping_min_delta: float = Field(default=0.0, ge=0)
    """An evaluation counts as better only when it lowers the best validation loss by more than this."""
    callbacks: list[str | dict[str, Any]] = Field(default_factory=list)
    """Extra callbacks by registry name (``router_monitor``, ``run_store``, ``tensorboard``, ...), or
    ``{"name": ..., **kwargs}``; see :mod:`moe_lab.train.callbacks.registry`."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"train.betas must be in [0, 1), got {self.betas}")
        return self


# Training/data defaults that go with each model preset (the preset owner defines the model shapes).
PRESET_RUN_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "data": {"seq_len": 128, "max_bytes": 1_000_000},
        "train": {"max_steps": 100, "batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 10},
    },
    # The demo (`moe-lab train`): must finish in < 10 minutes on 2 CPU cores with the val loss clearly below
    # the unigram baseline (see docs/guides/training.md for the measurement).
    "small": {
        "data": {"tokenizer": "bpe", "bpe_vocab_size": 4096, "seq_len": 128, "max_bytes": 3_000_000},
        "train": {
            "max_steps": 320,
            "batch_size": 16,
            "learning_rate": 3e-3,
            "warmup_steps": 30,
            "min_lr_ratio": 0.1,
            "eval_every": 80,
            "eval_batches": 20,
            "checkpoint_every": 80,
            "log_every": 20,
        },
    },
}


def _clean_error(msg: str) -> str:
    """Flatten pydantic's nested messages: ``train: batch_size: ... (got {...})`` -> ``train.batch_size: ...``."""
    msg = re.sub(r" \(got \{[^{}]*?(\}|\.\.\.)\)", "", msg)
    msg = re.sub(r"\b(model|data|train|parallel): unknown key '([^']+)'", r"unknown key '\1.\2'", msg)
    return re.sub(r"\b(model|data|train|parallel): (\w+): ", r"\1.\2: ", msg)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class RunConfig(Config):
    """A whole run: ``model``, ``data``, ``train`` and ``parallel`` sections (saved as ``config.yaml``)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """Data / expert parallelism of a ``torchrun`` job (ignored by single-process runs)."""

    @classmethod
    def load(
        cls,
        config_file: str | os.PathLike[str] | None = None,
        preset: str | None = None,
        overrides: list[str] | tuple[str, ...] = (),
    ) -> RunConfig:
        """Build a run config: model preset, then the YAML file's sections, then ``key=value`` overrides.

        The YAML file may name a preset itself (top-level ``preset: tiny``); ``preset`` given here wins.
        With neither a file nor a preset, the ``small`` preset is used.

        >>> RunConfig.load(preset="tiny", overrides=["train.max_steps=5"]).train.max_steps
        5
        """
        file_data: dict[str, Any] = {}
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as err:
                raise ConfigError(f"config file {path} is not valid YAML: {yaml_error_text(err)}") from None
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path}: expected a mapping with model/data/train sections")
            file_data = loaded
        file_preset = file_data.pop("preset", None)
        name = preset or file_preset or (None if config_file is not None else "small")
        base: dict[str, Any] = {}
        if name is not None:
            try:
                model_cfg = get_preset(str(name))
            except (KeyError, ValueError) as err:
                raise ConfigError(f"unknown preset '{name}': {err}") from None
            base["model"] = model_cfg.to_dict()
            base = _deep_merge(base, PRESET_RUN_DEFAULTS.get(str(name), {}))
        data = _deep_merge(base, file_data)
        where = f"{config_file}: " if config_file is not None else ""
        try:
            cfg = cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{where}{_clean_error(str(err))}") from None
        if overrides:
            try:
                cfg = cfg.with_overrides(list(overrides))
            except ConfigError as err:
                raise ConfigError(f"--set: {_clean_error(str(err))}") from None
        return cfg
