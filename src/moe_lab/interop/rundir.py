"""Hugging Face checkpoint folder <-> moe-lab run directory (what ``moe-lab convert`` does).

An imported run directory looks like one the trainer wrote, so ``eval``/``generate``/fine-tuning use it
unchanged::

    RUN_DIR/
      config.yaml                 RunConfig (model section from config.json; data.tokenizer -> tokenizer.json)
      checkpoints/step-0/         model.safetensors, trainer_state.json, COMPLETE
      tokenizer.json              copied (plus tokenizer_config.json etc. for the chat template)
      hf_source.json              family, source folder, original config.json (used again on export)

Example:
    >>> # import_to_run_dir("/models/OLMoE-1B-7B-0924", "runs/olmoe")
    >>> # export_run_dir("runs/olmoe-ft", "out/olmoe-ft-hf")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from moe_lab.config import atomic_write_text
from moe_lab.interop.api import TOKENIZER_FILES, load_pretrained, save_pretrained_hf
from moe_lab.interop.hf_config import HFArch, parse_hf_config

__all__ = ["HF_SOURCE", "export_run_dir", "import_to_run_dir", "load_run_model"]

HF_SOURCE = "hf_source.json"


def import_to_run_dir(
    hf_dir: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    family: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a local Hugging Face checkpoint folder into a new run directory (written atomically)."""
    from moe_lab.data import DataConfig
    from moe_lab.train.checkpoint import save_checkpoint
    from moe_lab.train.config import RunConfig, TrainConfig
    from moe_lab.train.rundir import RunDir

    src = Path(hf_dir)
    model = load_pretrained(src, family=family, dtype=dtype)
    arch: HFArch = model.hf_arch  # type: ignore[assignment]
    target = Path(run_dir)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        rd = RunDir(tmp)
        tok_files = [n for n in TOKENIZER_FILES if (src / n).is_file()]
        for name in tok_files:
            shutil.copy2(src / name, tmp / name)
        tokenizer = str(target.resolve() / "tokenizer.json") if "tokenizer.json" in tok_files else "byte"
        seq_len = min(2048, model.config.max_seq_len)
        cfg = RunConfig(
            model=model.config,
            data=DataConfig(tokenizer=tokenizer, seq_len=seq_len),
            train=TrainConfig(name=target.name, runs_dir=str(target.parent)),
        )
        cfg.to_yaml(rd.config_path)
        meta = {
            "train_state": {"step": 0},
            "model_config": model.config.to_dict(),
            "imported_from": str(src.resolve()),
        }
        save_checkpoint(rd.checkpoints_dir, 0, model=model, optimizer=None, trainer_state=meta)
        source = {
            "family": arch.family,
            "source": str(src.resolve()),
            "hf_config": json.loads((src / "config.json").read_text(encoding="utf-8")),
        }
        atomic_write_text(rd.path / HF_SOURCE, json.dumps(source, indent=2) + "\n")
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_run_model(
    run_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    merge_lora: bool = True,
) -> Any:
    """The model of a run directory at its newest (or the given) complete checkpoint.

    For a LoRA run (``adapter_config.json`` in the run directory) the adapters are applied, loaded and, with
    ``merge_lora``, merged into the base weights.
    """
    from moe_lab.models import MoEModel
    from moe_lab.train.checkpoint import latest_checkpoint, load_checkpoint
    from moe_lab.train.config import RunConfig

    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no config.yaml)")
    cfg = RunConfig.from_yaml(path / "config.yaml")
    ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint under checkpoints/")
    model = MoEModel(cfg.model)
    lora = None
    if (path / "adapter_config.json").is_file():  # a LoRA fine-tuning run: checkpoints hold the adapters
        from moe_lab.finetune.lora import apply_lora, read_adapter_config

        lora = apply_lora(model, read_adapter_config(path))
    load_checkpoint(ckpt, model=model, restore_rng=False)
    if lora is not None and merge_lora:
        lora.merge()  # in place: the same model object, adapters folded in
    source = path / HF_SOURCE
    if source.is_file():
        info = json.loads(source.read_text(encoding="utf-8"))
        model.hf_arch = parse_hf_config(info["hf_config"], info["family"])  # type: ignore[assignment]
    return model


def export_run_dir(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    family: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a run's (newest) checkpoint as a Hugging Face folder, with the run's tokenizer files."""
    path = Path(run_dir)
    model = load_run_model(path, checkpoint)
    has_tok = any((path / n).is_file() for n in TOKENIZER_FILES)
    return save_pretrained_hf(
        model,
        out_dir,
        family=family,
        tokenizer_dir=path if has_tok else None,
        max_shard_size=max_shard_size,
        dtype=dtype,
        overwrite=overwrite,
    )
