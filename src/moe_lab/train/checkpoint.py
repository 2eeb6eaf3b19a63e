"""Atomic checkpoints: ``checkpoints/step-N/`` written to a temp dir, marked complete, then renamed.

A checkpoint folder holds ``model.safetensors``, ``optimizer.pt`` (optimizer + schedule state, tensors
and plain values only, loaded with ``weights_only=True``), ``rng_state.pt`` (python, numpy, torch, cuda),
``trainer_state.json`` (step, counters, data-iterator position, model config) and the ``COMPLETE``
marker written last. Loaders skip hidden temp dirs and folders without the marker, so a crash while
writing never leaves something that looks like a checkpoint. A ``torchrun`` job writes the model and
optimizer as ``torch.distributed.checkpoint`` shards instead (``.metadata``, ``__R_0.distcp``; see
:mod:`moe_lab.train.distributed`); :func:`load_checkpoint` reads both kinds.

Example:
    >>> # path = save_checkpoint(run.checkpoints_dir, step, model=m, optimizer=opt, trainer_state={...})
    >>> # ckpt = load_checkpoint(latest_checkpoint(run.checkpoints_dir), model=m, optimizer=opt)
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

__all__ = [
    "COMPLETE_MARKER",
    "CheckpointMismatchError",
    "LoadedCheckpoint",
    "capture_rng_state",
    "check_model_config",
    "finalize_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "restore_rng_state",
    "save_checkpoint",
]

COMPLETE_MARKER = "COMPLETE"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")
# Test hook: kill this process (SIGKILL) while writing the checkpoint of this step, after the temp dir
# holds a partial checkpoint. Used by the crash-safety test; unset in normal use.
CRASH_ENV = "MOE_LAB_TEST_CRASH_IN_CHECKPOINT"


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a different model configuration."""


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` read besides the tensors it loaded in place."""

    path: Path
    step: int
    trainer_state: dict[str, Any]


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "_orig_mod", None)  # torch.compile wrapper
    return inner if isinstance(inner, nn.Module) else model


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as tensors and plain values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state((npst["name"], keys, npst["pos"], npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(checkpoints_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs and folders without ``COMPLETE`` are ignored)."""
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return []
    found = []
    for child in d.iterdir():
        step = _step_of(child)
        if step is not None and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((step, child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(path: str | os.PathLike[str]) -> Path | None:
    """Newest complete checkpoint under a run dir or a ``checkpoints/`` dir; a checkpoint dir is returned
    as is when complete."""
    p = Path(path)
    if (p / COMPLETE_MARKER).is_file():
        return p
    ckpts = list_checkpoints(p / "checkpoints") or list_checkpoints(p)
    return ckpts[-1] if ckpts else None


def save_checkpoint(
    checkpoints_dir: str | os.PathLike[str],
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
) -> Path:
    """Write ``checkpoints_dir/step-<step>/`` atomically and return its path.

    ``trainer_state`` (JSON-safe) should hold the loop counters, data position and ``model_config``.
    """
    d = Path(checkpoints_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step-{step}"
    tmp = d / f".tmp-step-{step}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        save_model(_unwrap(model), str(tmp / "model.safetensors"))
        if os.environ.get(CRASH_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        finalize_checkpoint(tmp, final, step, trainer_state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def finalize_checkpoint(tmp: Path, final: Path, step: int, trainer_state: dict[str, Any]) -> None:
    """Complete the checkpoint written into the temp dir ``tmp``: add ``rng_state.pt`` and
    ``trainer_state.json``, fsync, write ``COMPLETE`` last, then rename to ``final`` (replacing it)."""
    torch.save(capture_rng_state(), tmp / "rng_state.pt")
    meta = {"format_version": FORMAT_VERSION, "step": step, "torch_version": torch.__version__}
    meta.update(trainer_state)
    (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    for f in tmp.iterdir():
        if f.is_file():
            _fsync_file(f)
    (tmp / COMPLETE_MARKER).write_text(f"step {step}\n", encoding="utf-8")
    _fsync_file(tmp / COMPLETE_MARKER)
    d = final.parent
    if final.exists():  # re-saving the same step: move the old one aside, then swap
        old = d / f".old-step-{step}-{os.getpid()}-{time.time_ns()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    dir_fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def prune_checkpoints(checkpoints_dir: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and stale temp dirs of dead
    writers; returns the deleted checkpoint paths."""
    d = Path(checkpoints_dir)
    ckpts = list_checkpoints(d)
    doomed = ckpts[: max(0, len(ckpts) - keep_last)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    if d.is_dir():
        for child in d.iterdir():
            if child.name.startswith((".tmp-step-", ".old-step-")) and f"-{os.getpid()}-" not in child.name:
                shutil.rmtree(child, ignore_errors=True)
    return doomed


def check_model_config(saved: dict[str, Any], current: dict[str, Any], where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` naming the first field that differs."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise CheckpointMismatchError(
                f"{where} was written for a different model: model.{key} is {saved.get(key)!r} in the "
                f"checkpoint but {current.get(key)!r} in the current config"
            )


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    model_config: dict[str, Any] | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Load a complete checkpoint in place into ``model`` (and ``optimizer``); restore RNG states.

    With ``model_config`` the saved model config must match, else :class:`CheckpointMismatchError`.
    A distributed (DCP) checkpoint is resharded into ``model``, plain or parallelised.
    """
    from moe_lab.parallel import is_distributed_checkpoint

    p = Path(path)
    if not (p / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{p} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    if is_distributed_checkpoint(p):
        from moe_lab.train.distributed import load_dcp_checkpoint

        return load_dcp_checkpoint(
            p, model=_unwrap(model), optimizer=optimizer, model_config=model_config, restore_rng=restore_rng
        )
    try:
        meta = json.loads((p / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {p / 'trainer_state.json'}: {err}") from None
    if model_config is not None and "model_config" in meta:
        check_model_config(meta["model_config"], model_config, where=f"checkpoint {p}")
    missing, unexpected = load_model(_unwrap(model), str(p / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"checkpoint {p} does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if optimizer is not None and (p / "optimizer.pt").is_file():
        optimizer.load_state_dict(
            torch.load(p / "optimizer.pt", map_location=map_location, weights_only=True)
        )
    if restore_rng and (p / "rng_state.pt").is_file():
        restore_rng_state(torch.load(p / "rng_state.pt", map_location="cpu", weights_only=True))
    return LoadedCheckpoint(path=p, step=int(meta.get("step", 0)), trainer_state=meta)
