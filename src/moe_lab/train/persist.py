"""Run-directory and checkpoint persistence of :class:`~moe_lab.train.trainer.MoETrainer`.

The trainer's ``save_model``, ``save_checkpoint`` and resume logic live here as plain functions of the
trainer, so the training loop in :mod:`moe_lab.train.trainer` stays short. Every file is written
atomically (see :mod:`moe_lab.train.checkpoint`).

Example:
    >>> import torch, tempfile
    >>> from moe_lab.models import MoEModel
    >>> from moe_lab.train import MoETrainer
    >>> tr = MoETrainer(MoEModel.from_preset("tiny"), console=False)
    >>> _ = tr.train(torch.randint(0, 200, (8, 16)), max_steps=1, batch_size=4)
    >>> save_model_dir(tr, tempfile.mkdtemp()).joinpath("model.safetensors").is_file()
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from moe_lab.config import atomic_write_text
from moe_lab.parallel import export_consolidated
from moe_lab.train import distributed as mdist
from moe_lab.train.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from moe_lab.train.rundir import RunDir
from moe_lab.train.setup import model_config_dict, save_tokenizer
from moe_lab.train.state import TrainState

if TYPE_CHECKING:
    from moe_lab.train.trainer import MoETrainer

__all__ = ["open_run_dir", "restore_checkpoint", "save_model_dir", "save_trainer_checkpoint"]


def open_run_dir(tr: MoETrainer) -> None:
    """Create (rank 0) or attach to the run directory and write config.yaml and the tokenizer."""
    cfg = tr.config
    if tr.run_dir is None:
        target = (
            tr._run_dir_arg or cfg.run_dir or (os.path.join(cfg.runs_dir, cfg.name) if cfg.name else None)
        )
        if target is None:
            return
        if not tr.is_main_process:
            tr.run_dir = RunDir(target)
            return
        tr.run_dir = RunDir.create(target, overwrite=tr.overwrite)
    if not tr.is_main_process:
        return
    rd = tr.run_dir
    rd.path.mkdir(parents=True, exist_ok=True)
    rd.checkpoints_dir.mkdir(exist_ok=True)
    if tr.run_config is not None:
        tr.run_config.to_yaml(rd.config_path)
    elif not rd.config_path.exists():
        text = yaml.safe_dump({"model": model_config_dict(tr.model), "train": cfg.to_dict()}, sort_keys=False)
        atomic_write_text(rd.config_path, text)
    if tr.tokenizer is not None and not (rd.tokenizer_path.exists() or rd.tokenizer_name_path.exists()):
        save_tokenizer(tr.tokenizer, rd)


def restore_checkpoint(tr: MoETrainer, ckpt: Path, preloaded: Any = None) -> None:
    """Load model, optimizer, train state and data position from ``ckpt`` into the trainer ``tr``."""
    assert tr.optimizer is not None and tr._iter is not None
    mcfg = model_config_dict(tr.model)
    # the peak rates of the current config win over the checkpoint's (a resume may change them)
    peaks = [g["base_lr"] for g in tr.optimizer.param_groups]
    if preloaded is not None:
        loaded, named_optim = preloaded
        if named_optim is not None:
            mdist.load_named_optimizer_state(tr.model, tr.optimizer, named_optim)
    else:  # a single-file checkpoint in one process, or a DCP one anywhere
        loaded = load_checkpoint(
            ckpt, model=tr.model, optimizer=tr.optimizer, model_config=mcfg, map_location=tr.device
        )
    for group, peak in zip(tr.optimizer.param_groups, peaks, strict=True):
        group["base_lr"] = peak
    meta = loaded.trainer_state
    tr.state = TrainState.from_dict(meta.get("train_state", {}))
    if "data_state" in meta:
        tr._iter.load_state_dict(meta["data_state"])
    if tr.run_dir is None:
        tr.run_dir = RunDir(tr._run_dir_arg or ckpt.parent.parent)
    tr.resumed_from = ckpt


def save_model_dir(tr: MoETrainer, path: str | os.PathLike[str]) -> Path:
    """Save the model (``save_pretrained`` format) and the tokenizer into the folder ``path``."""
    p = Path(path)
    if tr.ctx.distributed:  # collective: gather the full model, rank 0 writes it
        export_consolidated(p, tr.model)
        if tr.tokenizer is not None and tr.is_main_process:
            save_tokenizer(tr.tokenizer, RunDir(p))
        return p
    p.mkdir(parents=True, exist_ok=True)
    save_pretrained = getattr(tr.model, "save_pretrained", None)
    if callable(save_pretrained):
        save_pretrained(str(p))
    else:
        from safetensors.torch import save_model

        save_model(tr.model, str(p / "model.safetensors"))
    if tr.tokenizer is not None:
        save_tokenizer(tr.tokenizer, RunDir(p))
    return p


def save_trainer_checkpoint(tr: MoETrainer) -> Path:
    """Write ``checkpoints/step-N`` (atomic), keep the last K, call ``on_checkpoint``."""
    if tr.run_dir is None:
        raise ValueError("no run directory: pass run_dir= to MoETrainer to write checkpoints")
    meta = {
        "train_state": tr.state.to_dict(),
        "data_state": tr._iter.state_dict() if tr._iter is not None else {},
        "model_config": model_config_dict(tr.model),
        "train_config": tr.config.to_dict(),
        "total_steps": tr.total_steps,
    }
    if tr.run_config is not None and hasattr(tr.run_config, "to_dict"):
        meta["run_config"] = tr.run_config.to_dict()  # the exact config (all sections) of this checkpoint
    save = mdist.save_dcp_checkpoint if tr.ctx.distributed else save_checkpoint
    extra = {"ctx": tr.ctx} if tr.ctx.distributed else {}
    path = save(
        tr.run_dir.checkpoints_dir,
        tr.state.step,
        model=tr.model,
        optimizer=tr.optimizer,
        trainer_state=meta,
        **extra,
    )
    if tr.is_main_process:
        prune_checkpoints(tr.run_dir.checkpoints_dir, tr.config.keep_last_checkpoints)
    tr._emit("on_checkpoint", tr, tr.state.step, path)
    return path
