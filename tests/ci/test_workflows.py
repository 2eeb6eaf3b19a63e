"""The workflow gate (`make workflows-lint` = .ci/lint-workflows.sh) passes on the repository and fails
on planted mistakes in a temporary copy, so it is known to be able to fail."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

SHA_PIN = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def run_gate(repo: Path, root: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(repo / ".ci" / "lint-workflows.sh"), str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path, repo: Path) -> Path:
    """A copy of .github/ and the CI scripts, to plant errors in."""
    shutil.copytree(repo / ".github", tmp_path / ".github")
    shutil.copytree(repo / ".ci", tmp_path / ".ci")
    return tmp_path


def test_gate_passes_on_the_repository(repo: Path, tool_env: dict[str, str]) -> None:
    result = run_gate(repo, repo, tool_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "jactionlint" in result.stdout and "check-jsonschema" in result.stdout


def test_gate_fails_on_each_planted_mistake(tree: Path, repo: Path, tool_env: dict[str, str]) -> None:
    """One copy with four independent mistakes: the gate runs every linter, so each must be reported."""
    ci = tree / ".github" / "workflows" / "ci.yml"
    text = ci.read_text()
    assert "needs: build\n" in text
    ci.write_text(text.replace("needs: build\n", "needs: buld\n", 1))  # unknown job (actionlint)

    docs = tree / ".github" / "workflows" / "docs.yml"
    text = docs.read_text()
    pinned = re.search(r"actions/checkout@[0-9a-f]{40} # v[\d.]+", text)
    assert pinned
    docs.write_text(text.replace(pinned.group(0), "actions/checkout@v4"))  # mutable tag (policy rule)

    (tree / ".ci" / "planted.sh").write_text("#!/usr/bin/env bash\nrm $(ls *.txt)\n")  # shellcheck SC2046

    dep = tree / ".github" / "dependabot.yml"
    dep.write_text(dep.read_text().replace("interval: weekly", "interval: fortnightly", 1))  # schema

    result = run_gate(repo, tree, tool_env)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "buld" in out
    assert "checkout@v4" in out
    assert "planted.sh" in out and "SC2046" in out
    assert "fortnightly" in out or "dependabot.yml" in out.split("check-jsonschema", 1)[1]


def _workflows(repo: Path) -> dict[str, dict]:
    return {
        p.name: yaml.safe_load(p.read_text()) for p in sorted((repo / ".github" / "workflows").glob("*.yml"))
    }


def test_every_action_is_pinned_by_sha_with_a_version_comment(repo: Path) -> None:
    files = [
        *(repo / ".github" / "workflows").glob("*.yml"),
        repo / ".github" / "actions" / "setup" / "action.yml",
    ]
    uses = []
    for path in files:
        for line in path.read_text().splitlines():
            m = re.match(r"\s*(?:-\s+)?uses:\s+(\S+)(.*)$", line)
            if m and not m.group(1).startswith("./"):
                uses.append((path.name, m.group(1), m.group(2)))
    assert uses
    for name, ref, rest in uses:
        assert SHA_PIN.match(ref), f"{name}: {ref} is not pinned to a full commit SHA"
        assert re.match(r"\s+# v\d+(\.\d+)*$", rest), f"{name}: {ref} lacks a '# vX.Y.Z' comment"


def test_least_privilege_timeouts_and_checkout_hardening(repo: Path) -> None:
    for name, wf in _workflows(repo).items():
        assert wf.get("permissions") == {}, f"{name}: top-level permissions must be {{}}"
        assert "concurrency" in wf, f"{name}: no concurrency group"
        for job_id, job in wf["jobs"].items():
            assert "timeout-minutes" in job, f"{name}/{job_id}: no timeout-minutes"
            assert "permissions" in job, f"{name}/{job_id}: no explicit permissions"
            for step in job.get("steps", []):
                if str(step.get("uses", "")).startswith("actions/checkout@"):
                    assert step.get("with", {}).get("persist-credentials") is False, f"{name}/{job_id}"
                assert "|| true" not in str(step.get("run", "")), f"{name}/{job_id}: a failure is hidden"


def test_ci_has_one_all_green_job_needing_every_other_job(repo: Path) -> None:
    jobs = _workflows(repo)["ci.yml"]["jobs"]
    gate = jobs["all-green"]
    assert gate["if"] == "always()"
    assert set(gate["needs"]) == set(jobs) - {"all-green"}


def test_write_permissions_only_where_needed(repo: Path) -> None:
    allowed = {
        ("security.yml", "bandit"): {"security-events"},
        ("docs.yml", "deploy"): {"pages", "id-token"},
        ("dependencies.yml", "pull-request"): {"contents", "pull-requests"},
    }
    for name, wf in _workflows(repo).items():
        for job_id, job in wf["jobs"].items():
            writes = {k for k, v in (job.get("permissions") or {}).items() if v == "write"}
            assert writes <= allowed.get((name, job_id), set()), f"{name}/{job_id}: writes {writes}"
