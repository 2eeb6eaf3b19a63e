"""`moe-lab train --nproc-per-node`: the torchrun command it builds, and the settings it refuses (exit 2,
one line) before any process starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lab.config import ConfigError
from moe_lab.train.config import RunConfig
from moe_lab.train.torchrun import check_launch, check_world, torchrun_command

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_single_node_command_is_standalone():
    cmd = torchrun_command(["--preset", "tiny", "--set", "a=1"], nproc_per_node=4)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    worker = ["-m", "moe_lab.train", "--preset", "tiny", "--set", "a=1"]
    assert cmd[3:] == ["--standalone", "--nproc-per-node", "4", *worker]


def test_multi_node_command_uses_c10d():
    cmd = torchrun_command(
        ["--preset", "tiny"], nproc_per_node=8, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500"
    )
    assert "--standalone" not in cmd
    flags = cmd[3:]
    assert flags[:10] == [
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "10.0.0.1:29500",
        "--nproc-per-node",
        "8",
    ]
    assert flags[10:] == ["-m", "moe_lab.train", "--preset", "tiny"]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"nproc_per_node": 0}, "--nproc-per-node must be >= 1"),
        ({"nproc_per_node": 2, "nnodes": 0}, "--nnodes must be >= 1"),
        ({"nproc_per_node": 2, "nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "--node-rank"),
        ({"nproc_per_node": 2, "nnodes": 2}, "needs --rdzv-endpoint"),
        ({"nproc_per_node": 2, "nnodes": 2, "rdzv_endpoint": "nohost"}, "HOST:PORT"),
    ],
)
def test_bad_launch_settings(kwargs, needle):
    nproc = kwargs.pop("nproc_per_node")
    with pytest.raises(ConfigError, match=needle):
        check_launch(nproc, **kwargs)


def test_local_port_in_use_is_refused_on_node_0_only():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(ConfigError, match="already in use"):
            check_launch(2, nnodes=2, node_rank=0, rdzv_endpoint=endpoint)
        check_launch(2, nnodes=2, node_rank=1, rdzv_endpoint=endpoint)  # node 1 joins node 0's server


@pytest.mark.parametrize(
    ("overrides", "world", "needle"),
    [
        (["parallel.expert_parallel=2"], 3, "world size 3 .* parallel.expert_parallel=2"),
        (["parallel.expert_parallel=3", "train.batch_size=6"], 3, "model.num_experts=4"),
        (["train.batch_size=6"], 4, "train.batch_size=6 .* world size 4"),
    ],
)
def test_world_checks(overrides, world, needle):
    cfg = RunConfig.load(preset="tiny", overrides=overrides)
    with pytest.raises(ConfigError, match=needle):
        check_world(cfg, world)
    check_world(RunConfig.load(preset="tiny", overrides=["parallel.expert_parallel=2"]), 4)


def test_cli_refuses_before_spawning(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MOE_LAB_DEBUG", "WORLD_SIZE")}
    env.update(PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    args = ["--preset", "tiny", "--name", "x", "--nproc-per-node", "3"]
    proc = subprocess.run(
        [sys.executable, "-m", "moe_lab.cli.main", "train", *args, "--set", "train.batch_size=8"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "moe-lab train: error: train.batch_size=8 (the global batch) is not divisible by the world size 3"
    ]
    assert not (tmp_path / "runs").exists()
