"""Secret scan gate: fail on any secret that is not in the committed, audited baseline.

Uses detect-secrets with the plugins and filters recorded in `.secrets.baseline`. Unlike
`detect-secrets-hook`, it never rewrites the baseline and ignores line numbers (a secret is the
same finding when the code around it moves); and it fails on baseline entries audited as real
secrets (`"is_secret": true`): those must be removed from the code and rotated, not baselined.

Usage:
    python .ci/secret_scan.py [--root DIR] [--baseline FILE]
Refresh the baseline after reviewing new false positives:
    detect-secrets scan --all-files --baseline .secrets.baseline && detect-secrets audit .secrets.baseline
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from detect_secrets.core import baseline as ds_baseline
from detect_secrets.core.secrets_collection import SecretsCollection

# Never scanned: tool caches, virtual environments, build outputs, run directories.
SKIP_DIRS = {
    ".git",
    ".venv",
    "venv",
    "node_modules",
    "runs",
    "site",
    "dist",
    "build",
    "bench-results",
    "test-artifacts",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "__pycache__",
    ".ci-cache",
}
SKIP_SUFFIXES = {".pyc", ".png", ".jpg", ".jpeg", ".gif", ".ico", ".woff", ".woff2", ".safetensors", ".pt"}


def list_files(root: Path) -> list[str]:
    """Files to scan, relative to root: git's tracked + untracked-not-ignored, else a directory walk."""
    try:
        top = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        in_git = Path(top).resolve() == root.resolve()
    except (OSError, subprocess.CalledProcessError):
        in_git = False
    if in_git:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        names = sorted({n for n in out.split("\0") if n})
    else:
        names = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            rel = Path(dirpath).relative_to(root)
            names.extend(str(rel / f) if str(rel) != "." else f for f in sorted(filenames))
    keep = []
    for name in names:
        path = Path(name)
        if set(path.parts) & SKIP_DIRS or path.suffix.lower() in SKIP_SUFFIXES:
            continue
        if name == ".secrets.baseline" or not (root / path).is_file():
            continue
        keep.append(name)
    return keep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="tree to scan (default: .)")
    parser.add_argument("--baseline", type=Path, help="baseline file (default: ROOT/.secrets.baseline)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    baseline_path = (args.baseline or root / ".secrets.baseline").resolve()
    if not baseline_path.is_file():
        print(f"secret scan: baseline {baseline_path} not found (create it with `detect-secrets scan`)")
        return 2
    try:
        known = ds_baseline.load(ds_baseline.load_from_file(str(baseline_path)), str(baseline_path))
    except Exception as err:  # detect-secrets raises plain exceptions on a malformed baseline
        print(f"secret scan: cannot read baseline {baseline_path}: {err}")
        return 2

    confirmed = [
        f"  {filename}: {secret.type} (audited as a real secret)"
        for filename, secret in known
        if secret.is_secret is True
    ]

    files = list_files(root)
    found = SecretsCollection()
    cwd = os.getcwd()
    os.chdir(root)  # detect-secrets records paths as given; keep them relative like the baseline's
    try:
        for name in files:
            found.scan_file(name)
    finally:
        os.chdir(cwd)
    new = found - known
    lines = [f"  {filename}:{secret.line_number}: {secret.type}" for filename, secret in new]

    print(f"secret scan: {len(files)} files scanned under {root}")
    failed = False
    if lines:
        failed = True
        print("secret scan: possible secrets not in the baseline:")
        print("\n".join(sorted(lines)))
        print(
            "Remove them (use environment variables or a secret store). If one is a false positive, "
            "add `# pragma: allowlist secret` to the line or refresh and audit the baseline."
        )
    if confirmed:
        failed = True
        print("secret scan: the baseline records real secrets; remove them from the code and rotate them:")
        print("\n".join(confirmed))
    if not failed:
        print("secret scan: no new secrets")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
