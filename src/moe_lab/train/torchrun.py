"""Launch a training run on several processes with ``torchrun`` (what ``moe-lab train --nproc-per-node``
does): check the settings before any process starts, build the ``python -m torch.distributed.run``
command, run it and return its exit status.

Example:
    >>> torchrun_command(["--preset", "tiny"], nproc_per_node=2)[3:]
    ['--standalone', '--nproc-per-node', '2', '-m', 'moe_lab.train', '--preset', 'tiny']
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from moe_lab.config import ConfigError
from moe_lab.parallel import check_port_free

__all__ = ["check_launch", "check_world", "run_torchrun", "torchrun_command"]


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--rdzv-endpoint must be HOST:PORT (e.g. 10.0.0.1:29500), got {endpoint!r}")
    return host.strip("[]"), int(port)


def _is_local(host: str) -> bool:
    """True when ``host`` names this machine (loopback, or one of its addresses)."""
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return False
    if ip.startswith("127.") or ip == "0.0.0.0":  # noqa: S104  # nosec B104 - a comparison, not a bind
        return True
    try:
        return ip in socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        return False


def check_launch(
    nproc_per_node: int, *, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None
) -> None:
    """The launcher's own settings; on node 0 a local rendezvous port must be free (else a second job
    would wait for, or join, the first one)."""
    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    if nnodes < 1:
        raise ConfigError(f"--nnodes must be >= 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank must be in [0, {nnodes - 1}] for --nnodes {nnodes}, got {node_rank}")
    if nnodes > 1 and rdzv_endpoint is None:
        raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's address and a free port)")
    if rdzv_endpoint is not None:
        host, port = _split_endpoint(rdzv_endpoint)
        if node_rank == 0 and _is_local(host):
            try:
                check_port_free(host, port)
            except ValueError as err:
                raise ConfigError(f"--rdzv-endpoint {rdzv_endpoint}: {err}") from None


def check_world(cfg: Any, world_size: int) -> None:
    """A run config fits ``world_size`` processes: expert parallelism and the global batch divide."""
    ep = cfg.parallel.expert_parallel
    if world_size % ep:
        raise ConfigError(
            f"the world size {world_size} (nnodes x nproc-per-node) is not divisible by "
            f"parallel.expert_parallel={ep}"
        )
    if cfg.model.num_experts % ep:
        raise ConfigError(
            f"model.num_experts={cfg.model.num_experts} is not divisible by parallel.expert_parallel={ep}"
        )
    if cfg.train.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} (the global batch) is not divisible by the world "
            f"size {world_size}"
        )


def torchrun_command(
    worker_args: Sequence[str],
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
) -> list[str]:
    """``python -m torch.distributed.run ... -m moe_lab.train WORKER_ARGS``: ``--standalone`` on one node
    without an endpoint (a free port, so two jobs never join each other), else the c10d rendezvous."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d"]
        cmd += ["--rdzv-endpoint", str(rdzv_endpoint)]
    cmd += ["--nproc-per-node", str(nproc_per_node), "-m", "moe_lab.train", *worker_args]
    return cmd


def run_torchrun(cmd: Sequence[str]) -> int:
    """Run the launcher; ``OMP_NUM_THREADS=1`` unless set (several ranks on few cores ran 10x slower
    without it). The workers' output (a failing rank's error, torchrun's summary) goes to this terminal."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(list(cmd), env=env, check=False).returncode
