"""Data and expert parallel training equal one process on the same global batch; DCP reshards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_worker.py")


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run(tmp_path, name, nproc, *extra, timeout=240, check=True):
    out = tmp_path / f"{name}.json"
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), *extra]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            str(WORKER),
            str(out),
            *extra,
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return json.loads(out.read_text())["losses"]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("ref"), "ref", 1, "--steps", "10")


def _close(a, b, rel=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)


@pytest.mark.parametrize(
    ("nproc", "mode", "ep"),
    [(2, "ddp", 1), (2, "ddp", 2), (4, "ddp", 2), (2, "fsdp", 2), (4, "fsdp", 2)],
)
def test_parallel_equals_single_process(tmp_path, reference, nproc, mode, ep):
    losses = _run(tmp_path, "par", nproc, "--dp-mode", mode, "--ep", str(ep), "--steps", "10")
    _close(losses, reference)
    assert losses[-1] < losses[0]


def test_resharded_resume_4_to_2_to_1(tmp_path, reference):
    ck = tmp_path / "ck"
    first = _run(
        tmp_path,
        "a",
        4,
        "--dp-mode",
        "fsdp",
        "--ep",
        "2",
        "--steps",
        "4",
        "--save",
        str(ck),
        "--save-at",
        "3",
    )
    assert (ck / ".metadata").is_file()
    second = _run(
        tmp_path,
        "b",
        2,
        "--dp-mode",
        "ddp",
        "--ep",
        "2",
        "--steps",
        "3",
        "--first-step",
        "4",
        "--load",
        str(ck),
    )
    _close(first + second, reference[:7])
    # and continue on one process from the same checkpoint
    single = _run(
        tmp_path,
        "c",
        1,
        "--steps",
        "6",
        "--first-step",
        "4",
        "--load",
        str(ck),
        "--export",
        str(tmp_path / "model"),
    )
    _close(first + single, reference)
    from moe_lab.models import MoEModel

    MoEModel.load(str(tmp_path / "model"))


def test_export_consolidated_from_four_ranks(tmp_path):
    import torch

    from moe_lab.models import MoEModel

    _run(tmp_path, "e", 4, "--dp-mode", "fsdp", "--ep", "2", "--steps", "2", "--export", str(tmp_path / "m4"))
    _run(tmp_path, "e1", 1, "--steps", "2", "--export", str(tmp_path / "m1"))
    a = MoEModel.load(str(tmp_path / "m4")).state_dict()
    b = MoEModel.load(str(tmp_path / "m1")).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)  # two AdamW steps apart in float order


def test_killed_rank_fails_fast_with_its_rank(tmp_path):
    proc = _run(tmp_path, "die", 2, "--ep", "2", "--steps", "10", "--die-rank", "1", check=False, timeout=120)
    assert proc.returncode != 0
    assert "rank" in (proc.stderr + proc.stdout).lower()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback(tmp_path, reference):
    port = _free_port()
    out = tmp_path / "mn.json"
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node-rank={node}",
            "--nproc-per-node=2",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=moe-lab-test",
            "--local-addr=127.0.0.1",
            str(WORKER),
            str(out),
            "--ep",
            "2",
            "--dp-mode",
            "fsdp",
            "--steps",
            "10",
        ]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        )
    logs = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(se[-3000:])
        assert p.returncode == 0, "\n".join(logs)
    data = json.loads(out.read_text())
    assert data["world"] == 4
    _close(data["losses"], reference)
