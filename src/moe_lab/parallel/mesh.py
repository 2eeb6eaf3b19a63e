"""Process-group and device-mesh set-up for ``torchrun`` jobs: a 2-D ``(dp, ep)`` mesh.

Ranks are laid out row-major: ``rank = dp_index * ep + ep_index``, so an expert-parallel group is a block of
consecutive ranks (on one node when ``ep`` divides the processes per node) and a data-parallel group holds
the ranks that own the same experts.

Example (inside ``torchrun --nproc-per-node 4``):
    >>> # ctx = init_distributed(ParallelConfig(expert_parallel=2), num_experts=8)
    >>> # ctx.dp_size, ctx.ep_size  -> (2, 2)
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from moe_lab.parallel.config import ParallelConfig

__all__ = ["ParallelContext", "check_port_free", "init_distributed", "shutdown", "single_process_context"]


@dataclass
class ParallelContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    dp_size: int
    ep_size: int
    device: torch.device
    mesh: Any = None  # DeviceMesh with dims ("dp", "ep"), or None for one process

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep_size

    @property
    def ep_group(self) -> Any:
        return self.mesh.get_group("ep") if self.mesh is not None else None

    @property
    def dp_group(self) -> Any:
        return self.mesh.get_group("dp") if self.mesh is not None else None

    @property
    def ep_mesh(self) -> Any:
        return self.mesh["ep"] if self.mesh is not None else None


def single_process_context(device: torch.device | str = "cpu") -> ParallelContext:
    """The context of an ordinary single-process run."""
    return ParallelContext(0, 1, 0, 1, 1, torch.device(device))


def check_port_free(host: str, port: int) -> None:
    """Raise a clear error when ``host:port`` is already taken (a rendezvous would hang or cross-join)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise ValueError(
                f"port {port} on {host} is already in use: choose another --master-port / rdzv port"
            ) from None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def init_distributed(
    cfg: ParallelConfig, *, num_experts: int | None = None, device: str = "auto"
) -> ParallelContext:
    """Initialise ``torch.distributed`` from the ``torchrun`` environment and build the ``(dp, ep)`` mesh.

    Without ``WORLD_SIZE`` (or with 1) this returns a single-process context and starts nothing.
    Checks, with messages that name the setting: world size divisible by ``parallel.expert_parallel``,
    ``model.num_experts`` divisible by it.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    ep = cfg.expert_parallel
    if world == 1:
        if ep != 1:
            raise ValueError(
                f"parallel.expert_parallel={ep} needs at least {ep} processes; launch with --nproc-per-node {ep} (or torchrun)"
            )
        return single_process_context(dev)
    if world % ep:
        raise ValueError(f"world size {world} is not divisible by parallel.expert_parallel={ep}")
    if num_experts is not None and num_experts % ep:
        raise ValueError(f"model.num_experts={num_experts} is not divisible by parallel.expert_parallel={ep}")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    return ParallelContext(rank, world, local_rank, world // ep, ep, dev, mesh)


def shutdown(ctx: ParallelContext, exit_code: int | None = None) -> None:
    """End a distributed job cleanly: barrier, destroy the group, flush, and (optionally) ``os._exit``.

    Exiting with ``os._exit`` after ``destroy_process_group`` avoids a gloo worker-thread race that made
    processes abort at interpreter exit now and then.
    """
    if ctx.distributed and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    if exit_code is not None:
        os._exit(exit_code)
