"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP): sharded save, resharded load.

A checkpoint directory ``checkpoints/step-N/`` of a distributed run holds the DCP files (``.metadata`` and one
``__R_0.distcp`` per writing rank) for ``{"model", "optim"}``, plus ``trainer_state.json`` written by rank 0.
Because the experts are DTensors sharded over the ``ep`` mesh and FSDP2 parameters are DTensors over the
world mesh, a checkpoint saved with 4 processes loads with 2, with 1 (no process group), or with 4 again.
:func:`export_consolidated` writes an ordinary single-file ``model.safetensors`` that the single-process
tools (eval, generate, serve, convert) load.

Example:
    >>> # save_distributed(path, model, optimizer)         # every rank
    >>> # load_distributed(path, model, optimizer)         # every rank, any world size
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_lab.parallel.data_parallel import unwrap

__all__ = [
    "DCP_MARKER",
    "export_consolidated",
    "is_distributed_checkpoint",
    "load_distributed",
    "save_distributed",
]

DCP_MARKER = ".metadata"


def is_distributed_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds a DCP checkpoint."""
    return (Path(path) / DCP_MARKER).is_file()


def _state(model: nn.Module, optimizer: Any | None, *, full: bool = False) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=full, cpu_offload=full)
    inner = unwrap(model)
    state: dict[str, Any] = {"model": get_model_state_dict(inner, options=opts)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(inner, optimizer, options=opts)
    return state


def save_distributed(path: str | os.PathLike[str], model: nn.Module, optimizer: Any | None = None) -> Path:
    """Every rank writes its shards into ``path`` (created); atomic: written to ``path.tmp`` then renamed."""
    import torch.distributed.checkpoint as dcp

    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=str(tmp))
    if dist.is_initialized():
        dist.barrier()
    if is_main:
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    if dist.is_initialized():
        dist.barrier()
    return target


def load_distributed(path: str | os.PathLike[str], model: nn.Module, optimizer: Any | None = None) -> None:
    """Load a DCP checkpoint into ``model`` (and ``optimizer``), resharding to the current layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    p = Path(path)
    if not is_distributed_checkpoint(p):
        raise FileNotFoundError(f"{p}: not a distributed checkpoint (no {DCP_MARKER})")
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(p))
    inner = unwrap(model)
    set_model_state_dict(inner, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(inner, optimizer, state["optim"])


def export_consolidated(path: str | os.PathLike[str], model: nn.Module) -> Path | None:
    """Gather the full model on rank 0 and write a moe-lab model directory (``config.yaml`` +
    ``model.safetensors``). Collective: call on every rank; returns the path on rank 0, else None."""
    from moe_lab.models.io import save_model_dir

    full = _state(model, None, full=True)["model"]
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    inner = unwrap(model)
    cfg = inner.config  # type: ignore[attr-defined]
    from moe_lab.models import MoEModel

    plain = MoEModel(cfg)
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in full.items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"consolidated state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        return save_model_dir(plain, Path(path))
