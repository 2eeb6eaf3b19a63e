"""The security gate (`make security` = .ci/security-scan.sh: bandit + secret scan against the baseline)
passes on a clean tree and fails on a planted secret and on a planted `eval(`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

CLEAN_MODULE = '''"""A small clean module."""


def add(a: int, b: int) -> int:
    """Return a + b."""
    return a + b
'''


def run_gate(repo: Path, root: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(repo / ".ci" / "security-scan.sh"), str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


@pytest.fixture
def tree(tmp_path: Path, repo: Path) -> Path:
    """A small project: src/pkg/ with one clean module and the repository's baseline settings, no results."""
    pkg = tmp_path / "src" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""pkg."""\n')
    (pkg / "mathx.py").write_text(CLEAN_MODULE)
    baseline = json.loads((repo / ".secrets.baseline").read_text())
    baseline["results"] = {}
    (tmp_path / ".secrets.baseline").write_text(json.dumps(baseline, indent=2))
    return tmp_path


def test_gate_passes_on_a_clean_tree(tree: Path, repo: Path, tool_env: dict[str, str]) -> None:
    result = run_gate(repo, tree, tool_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no new secrets" in result.stdout


def test_gate_fails_on_a_planted_secret(tree: Path, repo: Path, tool_env: dict[str, str]) -> None:
    # Built at run time so that this test file itself holds no secret-shaped string.
    key_id = "AKIA" + "Q7ZD" * 4
    (tree / "src" / "pkg" / "settings.py").write_text(f'AWS_ACCESS_KEY_ID = "{key_id}"\n')
    result = run_gate(repo, tree, tool_env)
    assert result.returncode != 0
    assert "src/pkg/settings.py:1: AWS Access Key" in result.stdout


def test_gate_fails_on_a_planted_eval(tree: Path, repo: Path, tool_env: dict[str, str]) -> None:
    (tree / "src" / "pkg" / "calc.py").write_text("def calc(expr: str) -> object:\n    return eval(expr)\n")
    result = run_gate(repo, tree, tool_env)
    assert result.returncode != 0
    assert "B307" in result.stdout and "calc.py" in result.stdout


def test_gate_fails_on_a_baseline_entry_audited_as_real(
    tree: Path, repo: Path, tool_env: dict[str, str]
) -> None:
    key_id = "AKIA" + "M3XR" * 4
    (tree / "src" / "pkg" / "settings.py").write_text(f'KEY = "{key_id}"\n')
    baseline_path = tree / ".secrets.baseline"
    scan = subprocess.run(
        ["detect-secrets", "scan", "--all-files", "--baseline", str(baseline_path)],
        cwd=tree,
        capture_output=True,
        text=True,
        env=tool_env,
        timeout=120,
    )
    assert scan.returncode == 0, scan.stderr
    data = json.loads(baseline_path.read_text())
    assert data["results"], "detect-secrets should have recorded the planted key"
    # Baselined but unaudited/false-positive: accepted (line numbers do not matter).
    assert run_gate(repo, tree, tool_env).returncode == 0
    for items in data["results"].values():
        for item in items:
            item["is_secret"] = True
    baseline_path.write_text(json.dumps(data, indent=2))
    result = run_gate(repo, tree, tool_env)
    assert result.returncode != 0
    assert "audited as a real secret" in result.stdout


def test_gate_reports_a_missing_baseline(tree: Path, repo: Path, tool_env: dict[str, str]) -> None:
    (tree / ".secrets.baseline").unlink()
    result = run_gate(repo, tree, tool_env)
    assert result.returncode != 0
    assert "baseline" in result.stdout and "not found" in result.stdout
    assert shutil.which("bandit", path=tool_env["PATH"])
