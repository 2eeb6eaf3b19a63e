"""`make install` is idempotent: the stamp is keyed on pyproject.toml + constraints.txt (and EXTRAS).

Runs the real Makefile in a scratch directory whose `.venv/bin/python` is a stand-in that records its
arguments, so nothing is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls.log"
"""


@pytest.fixture
def project(tmp_path: Path, repo: Path) -> Path:
    if shutil.which("make") is None:
        pytest.fail("GNU make is required by the project's gates")
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(repo / name, tmp_path / name)
    bindir = tmp_path / ".venv" / "bin"
    bindir.mkdir(parents=True)
    fake = bindir / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return tmp_path


def make(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(project), *args], capture_output=True, text=True, timeout=60)


def pip_installs(project: Path) -> list[str]:
    log = project / ".venv" / "calls.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [line for line in lines if line.startswith("-m pip install -c constraints.txt -e")]


def test_install_runs_once_then_again_when_the_dependencies_change(project: Path) -> None:
    first = make(project, "install")
    assert first.returncode == 0, first.stderr
    assert pip_installs(project) == ["-m pip install -c constraints.txt -e .[all]"]

    second = make(project, "install")
    assert second.returncode == 0, second.stderr
    assert len(pip_installs(project)) == 1, "a second `make install` must not reinstall"

    with (project / "constraints.txt").open("a") as f:
        f.write("numpy<3\n")
    assert make(project, "install").returncode == 0
    assert len(pip_installs(project)) == 2, "changing constraints.txt must reinstall"

    assert make(project, "install", "EXTRAS=dev").returncode == 0
    assert pip_installs(project)[-1] == "-m pip install -c constraints.txt -e .[dev]"
    stamps = sorted(p.name for p in (project / ".venv").glob(".installed-*"))
    assert len(stamps) == 1 and stamps[0].startswith(".installed-dev-")


def test_help_lists_the_gates(project: Path) -> None:
    out = make(project, "help")
    assert out.returncode == 0
    for target in ("install", "test", "lint", "typecheck", "security", "audit", "docs", "bench-compare"):
        assert f" {target} " in out.stdout


def test_integration_target_explains_a_missing_database_url(project: Path) -> None:
    out = subprocess.run(
        ["make", "-C", str(project), "test-integration"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode != 0
    assert "MOE_LAB_TEST_POSTGRES_URL is not set" in out.stderr
