"""Run a training job from a :class:`RunConfig`: data, tokenizer, model, run directory, trainer.

This is what ``moe-lab train`` and ``python -m moe_lab.train`` call. Under ``torchrun`` every rank runs
these functions; rank 0 alone builds the tokenizer first and writes the run directory, the other ranks
then read the tokenizer from it, so all ranks tokenize the same way.

Example:
    >>> from moe_lab.train.config import RunConfig
    >>> from moe_lab.train.launch import train_from_config
    >>> cfg = RunConfig.load(preset="tiny", overrides=["train.max_steps=2", "data.max_bytes=50000"])
    >>> # result = train_from_config(cfg, name="quick", runs_dir="runs")
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from moe_lab.config import ConfigError
from moe_lab.data import build_datasets, load_tokenizer
from moe_lab.models import MoEModel
from moe_lab.train import distributed as mdist
from moe_lab.train.baseline import unigram_baseline
from moe_lab.train.batches import is_indexable
from moe_lab.train.callbacks.base import Callback
from moe_lab.train.checkpoint import latest_checkpoint
from moe_lab.train.config import RunConfig
from moe_lab.train.results import TrainingResult
from moe_lab.train.rundir import RunDir, RunExistsError, default_run_name
from moe_lab.train.trainer import MoETrainer, save_tokenizer, seed_everything

__all__ = [
    "load_run_config",
    "load_run_model",
    "load_run_tokenizer",
    "resolve_run_dir",
    "resume_run",
    "train_from_config",
]


def resolve_run_dir(cfg: RunConfig, *, name: str | None = None, runs_dir: str | None = None) -> Path:
    """``train.run_dir``, else ``<runs_dir>/<name>`` (CLI arguments win over the config)."""
    if cfg.train.run_dir and name is None and runs_dir is None:
        return Path(cfg.train.run_dir)
    run_name = name or cfg.train.name or default_run_name()
    if Path(run_name).name != run_name or run_name in (".", ".."):
        raise ConfigError(f"train.name must be a plain folder name, got {run_name!r}")
    return Path(runs_dir or cfg.train.runs_dir) / run_name


def _check_shapes(cfg: RunConfig) -> None:
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len ({cfg.data.seq_len}) is larger than model.max_seq_len ({cfg.model.max_seq_len})"
        )


def _build_data(cfg: RunConfig, tokenizer: Any = None) -> tuple[Any, Any, Any]:
    try:
        train_ds, val_ds, tok = build_datasets(cfg.data, tokenizer=tokenizer)
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"data.source: cannot read {cfg.data.source!r}: {err}") from None
    if is_indexable(train_ds) and len(train_ds) == 0:
        raise ValueError(
            f"data.source {cfg.data.source!r} gave no training sequences of data.seq_len={cfg.data.seq_len} "
            "tokens (empty or too little text)"
        )
    return train_ds, val_ds, tok


def _with_vocab(cfg: RunConfig, vocab_size: int) -> RunConfig:
    """The model's vocabulary follows the tokenizer."""
    if cfg.model.vocab_size == vocab_size:
        return cfg
    return cfg.with_overrides([f"model.vocab_size={vocab_size}"])


def _with_baseline(trainer: MoETrainer, train_ds: Any, val_ds: Any, vocab_size: int) -> Any:
    """Store the unigram baseline in the trainer's summary; returns the val set (None when empty)."""
    if val_ds is None or (is_indexable(val_ds) and len(val_ds) == 0):
        return None
    if is_indexable(train_ds) and is_indexable(val_ds) and trainer.is_main_process:
        trainer.summary_extra.update(unigram_baseline(train_ds, val_ds, vocab_size))
    return val_ds


def train_from_config(
    cfg: RunConfig,
    *,
    name: str | None = None,
    runs_dir: str | None = None,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
    console: bool = True,
) -> TrainingResult:
    """Build data, tokenizer and model from ``cfg``, make the run directory and train.

    Refuses an existing run directory unless ``overwrite``. The saved ``config.yaml`` is ``cfg`` with
    ``model.vocab_size`` set to the tokenizer's and the run name filled in.
    Under ``torchrun`` the run name is rank 0's, and only rank 0 writes.
    """
    ctx = _job(cfg)
    path = resolve_run_dir(cfg, name=name, runs_dir=runs_dir)
    if ctx.distributed:
        path = Path(mdist.broadcast_text(str(path), ctx))  # a time-stamped default name is rank 0's
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise RunExistsError(
            f"run directory {path} already exists; pass --overwrite to replace it or --resume {path} to continue it"
        )
    _check_shapes(cfg)
    if ctx.distributed:
        dist.barrier()  # every rank has checked the folder before rank 0 creates it
    if ctx.is_main:
        train_ds, val_ds, tok = _build_data(cfg)
        run = RunDir.create(path, overwrite=overwrite)
        save_tokenizer(tok, run)
    if ctx.distributed:
        dist.barrier()
    if not ctx.is_main:
        run = RunDir(path)
        train_ds, val_ds, tok = _build_data(cfg, tokenizer=load_run_tokenizer(path, cfg))
    cfg = _with_vocab(cfg, int(tok.vocab_size))
    cfg = cfg.with_overrides(
        {"train.name": path.name, "train.runs_dir": str(path.parent), "train.run_dir": None}
    )
    seed_everything(cfg.train.seed)
    model = MoEModel(cfg.model)  # the same seed on every rank: the same initial weights
    trainer = MoETrainer(
        model, cfg.train, run_dir=run, callbacks=callbacks, tokenizer=tok, run_config=cfg, console=console
    )
    val_ds = _with_baseline(trainer, train_ds, val_ds, int(tok.vocab_size))
    try:
        return trainer.train(train_ds, val_ds)
    except Exception:
        if ctx.is_main:
            _remove_if_unstarted(run)
        raise


def _remove_if_unstarted(run: RunDir) -> None:
    """A run that failed before its first step (a batch larger than the data, streaming without
    ``max_steps``, ...) leaves no half-made folder that blocks the same command: removed when it holds no
    checkpoint and no metrics."""
    metrics = run.metrics_path
    if latest_checkpoint(run.path) is None and (not metrics.exists() or metrics.stat().st_size == 0):
        shutil.rmtree(run.path, ignore_errors=True)


def _job(cfg: RunConfig) -> Any:
    """This process's place in a ``torchrun`` job (a single-process context outside one)."""
    return mdist.job_context(cfg.parallel, num_experts=cfg.model.num_experts, device=cfg.train.device)


def load_run_config(run_dir: str | os.PathLike[str]) -> RunConfig:
    """The ``config.yaml`` of a run directory (errors name the path)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory not found: {path}")
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no config.yaml)")
    return RunConfig.from_yaml(path / "config.yaml")


def load_run_tokenizer(run_dir: str | os.PathLike[str], cfg: RunConfig | None = None) -> Any:
    """The tokenizer saved in a run directory (``tokenizer.json``, or ``tokenizer.txt`` naming one)."""
    rd = RunDir(run_dir)
    if rd.tokenizer_path.is_file():
        return load_tokenizer(str(rd.tokenizer_path))
    if rd.tokenizer_name_path.is_file():
        return load_tokenizer(rd.tokenizer_name_path.read_text(encoding="utf-8").strip())
    if cfg is not None and cfg.data.tokenizer == "byte":
        return load_tokenizer("byte")
    raise FileNotFoundError(f"{rd.path} has no tokenizer.json")


def resume_run(
    run_dir: str | os.PathLike[str],
    *,
    overrides: Sequence[str] = (),
    callbacks: Sequence[Callback] = (),
    console: bool = True,
) -> TrainingResult:
    """Continue the run in ``run_dir`` exactly from its newest complete checkpoint.

    ``overrides`` may change ``train.*`` settings (e.g. ``train.max_steps=2000`` to train longer); a
    changed ``model.*`` or ``data.*`` setting that no longer fits the checkpoint is refused.
    """
    path = Path(run_dir)
    cfg = load_run_config(path)
    if latest_checkpoint(path) is None:
        raise FileNotFoundError(f"no complete checkpoint in {path / 'checkpoints'} to resume from")
    if overrides:
        cfg = cfg.with_overrides(list(overrides))
    _check_shapes(cfg)
    tok = load_run_tokenizer(path, cfg)
    train_ds, val_ds, _ = _build_data(cfg, tokenizer=tok)
    if int(tok.vocab_size) > cfg.model.vocab_size:  # a padded embedding (imported Qwen models) is fine
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the run's tokenizer's "
            f"({tok.vocab_size}): the tokenizer can produce ids the model cannot embed"
        )
    _job(cfg)  # joins the torchrun job, if any, before the model is built
    seed_everything(cfg.train.seed)
    model = MoEModel(cfg.model)
    run = RunDir(path)
    # config.yaml is rewritten by the trainer once the checkpoint has been restored into this config
    trainer = MoETrainer(
        model, cfg.train, run_dir=run, callbacks=callbacks, tokenizer=tok, run_config=cfg, console=console
    )
    val_ds = _with_baseline(trainer, train_ds, val_ds, int(tok.vocab_size))
    return trainer.train(train_ds, val_ds, resume_from=path)


def load_run_model(
    run_dir: str | os.PathLike[str], *, checkpoint: str | os.PathLike[str] | None = None, device: str = "cpu"
) -> tuple[MoEModel, RunConfig, Any, Path]:
    """The trained model of a run (newest complete checkpoint, or ``checkpoint``), its config and tokenizer.

    The model is built from the config stored in the checkpoint, so training-time overrides (loss
    coefficients, expert dropout) are the ones it was trained with. Returned in eval mode.
    """
    import json

    from moe_lab.models import ModelConfig
    from moe_lab.train.checkpoint import load_checkpoint

    cfg = load_run_config(run_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint in {Path(run_dir) / 'checkpoints'}")
    ckpt_dir = latest_checkpoint(ckpt)
    if ckpt_dir is None:
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint")
    meta = json.loads((ckpt_dir / "trainer_state.json").read_text(encoding="utf-8"))
    model_cfg = ModelConfig.from_dict(meta["model_config"]) if meta.get("model_config") else cfg.model
    tok = load_run_tokenizer(run_dir, cfg)
    if int(tok.vocab_size) > model_cfg.vocab_size:
        raise ConfigError(
            f"{ckpt_dir}: the checkpoint's model embeds {model_cfg.vocab_size} token ids but the tokenizer of "
            f"{run_dir} has {tok.vocab_size}: the checkpoint belongs to another run"
        )
    model = MoEModel(model_cfg)
    load_checkpoint(ckpt_dir, model=model, restore_rng=False)  # a DCP checkpoint too (resharded)
    model.to(device).eval()
    return model, cfg, tok, ckpt_dir
