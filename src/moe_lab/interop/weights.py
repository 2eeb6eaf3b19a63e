"""Safetensors checkpoint files as Hugging Face lays them out: read (single file or sharded with an index
JSON), write (sharded + index), and an atomic directory write.

The per-family key mapping lives in :mod:`moe_lab.interop.families`; this file only moves tensors between
disk and ``dict[str, Tensor]``.

Example:
    >>> from moe_lab.interop.weights import parse_size
    >>> parse_size("5MB")
    5000000
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "SAFE_INDEX",
    "SAFE_SINGLE",
    "atomic_dir",
    "checkpoint_keys",
    "parse_size",
    "read_checkpoint",
    "write_checkpoint",
]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str, what: str = "max_shard_size") -> int:
    """``"5GB"`` / ``"500MiB"`` / ``1000`` -> bytes (decimal units like Hugging Face's ``max_shard_size``);
    errors name ``what``."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"{what} must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if not match:
        raise ValueError(f"{what}: expected a size such as '5GB' or '500MB', got {size!r}")
    value = int(float(match.group(1)) * _UNITS[match.group(2) or ""])
    if value <= 0:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return value


def _shard_files(ckpt_dir: Path) -> list[Path]:
    index = ckpt_dir / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"{index}: not a valid safetensors index (expected a 'weight_map' object)"
            ) from err
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (ckpt_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) missing from {ckpt_dir}: {', '.join(missing)}")
        return [ckpt_dir / f for f in files]
    single = ckpt_dir / SAFE_SINGLE
    if single.is_file():
        return [single]
    others = sorted(ckpt_dir.glob("*.safetensors"))
    if others:
        return others
    if any(ckpt_dir.glob("*.bin")) or any(ckpt_dir.glob("*.pt")):
        raise ValueError(
            f"{ckpt_dir}: only pickle weights (*.bin) found; moe-lab reads safetensors only. Convert them with "
            "transformers first: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
            "safe_serialization=True)"
        )
    raise FileNotFoundError(f"{ckpt_dir}: no {SAFE_SINGLE}, {SAFE_INDEX} or *.safetensors file")


def checkpoint_keys(ckpt_dir: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor name in the checkpoint and its shape, without reading the data."""
    out: dict[str, tuple[int, ...]] = {}
    for shard in _shard_files(Path(ckpt_dir)):
        with safe_open(str(shard), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[key] = tuple(fh.get_slice(key).get_shape())
    return out


def read_checkpoint(
    ckpt_dir: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read all tensors of a (possibly sharded) safetensors checkpoint directory.

    Args:
        ckpt_dir: folder with ``model.safetensors`` or ``model.safetensors.index.json`` + shards.
        dtype: cast floating tensors to this dtype (None keeps the stored dtype).
    """
    out: dict[str, torch.Tensor] = {}
    for shard in _shard_files(Path(ckpt_dir)):
        with safe_open(str(shard), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                if key in out:
                    raise ValueError(f"{shard}: tensor '{key}' appears in more than one shard")
                t = fh.get_tensor(key)
                out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def write_checkpoint(
    state: dict[str, torch.Tensor], out_dir: str | os.PathLike[str], max_shard_size: int | str = "5GB"
) -> list[str]:
    """Write ``state`` as safetensors shards of at most ``max_shard_size`` bytes (a tensor larger than the
    limit gets a shard of its own) plus ``model.safetensors.index.json`` when there is more than one shard.

    Returns the shard file names. ``out_dir`` must exist; use :func:`atomic_dir` for an atomic write.
    """
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = tensor.detach().to("cpu").contiguous()
        sizes[-1] += nbytes
    out = Path(out_dir)
    if len(shards) == 1:
        save_file(shards[0], str(out / SAFE_SINGLE), metadata={"format": "pt"})
        return [SAFE_SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
    (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out_dir`` in one rename.

    ``out_dir`` may not exist, may be empty, or (with ``overwrite=True``) may hold an older export.
    On failure the temporary folder is removed and ``out_dir`` is left as it was.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
