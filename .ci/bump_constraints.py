"""Bump the `name==version` pins of constraints.txt to the newest releases, keeping comments.

Used by the weekly dependencies workflow: it bumps, runs the tests against the new pins, and opens a
pull request. Versions come from `pip index versions` (the index pip is configured with, or one given
per package with --index NAME=URL, e.g. PyTorch's CPU wheel index for torch). Pre-releases are skipped
and local labels (`+cpu`) dropped. Prints a Markdown summary of the changes; `--check` exits 1 when
something would change, without writing.

Usage:
    python .ci/bump_constraints.py [--file constraints.txt] [--index torch=URL] [--check]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from packaging.version import InvalidVersion, Version

PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)(?P<rest>.*)$")


def newest_version(name: str, index_url: str | None) -> Version:
    """The newest final release of `name` that pip can see."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", name, "--disable-pip-version-check"]
    if index_url:
        cmd += ["--index-url", index_url]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    match = re.search(r"Available versions:\s*(.+)", out)
    if not match:
        raise SystemExit(f"bump_constraints: no versions of {name!r} in pip's answer:\n{out}")
    versions = []
    for raw in match.group(1).split(","):
        try:
            version = Version(raw.strip().split("+", 1)[0])
        except InvalidVersion:
            continue
        if not version.is_prerelease and not version.is_devrelease:
            versions.append(version)
    if not versions:
        raise SystemExit(f"bump_constraints: no final release of {name!r} found")
    return max(versions)


def bump(text: str, indexes: dict[str, str]) -> tuple[str, list[tuple[str, str, str]]]:
    """Return the new file text and the (name, old, new) changes."""
    lines = []
    changes = []
    for line in text.splitlines(keepends=True):
        match = PIN.match(line.strip())
        if not match:
            lines.append(line)
            continue
        name, old = match.group("name"), match.group("version")
        new = str(newest_version(name, indexes.get(name.lower())))
        if Version(new) > Version(old.split("+", 1)[0]):
            changes.append((name, old, new))
            line = line.replace(f"{name}=={old}", f"{name}=={new}", 1)
        lines.append(line)
    return "".join(lines), changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=Path("constraints.txt"))
    parser.add_argument("--index", action="append", default=[], metavar="NAME=URL")
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if a pin is outdated")
    args = parser.parse_args(argv)
    indexes = {}
    for item in args.index:
        name, sep, url = item.partition("=")
        if not sep or not url:
            parser.error(f"--index expects NAME=URL, got {item!r}")
        indexes[name.lower()] = url
    new_text, changes = bump(args.file.read_text(encoding="utf-8"), indexes)
    if not changes:
        print(f"All pins in {args.file} are current.")
        return 0
    print(f"Pins bumped in `{args.file}`:\n")
    for name, old, new in changes:
        print(f"- `{name}`: {old} -> {new}")
    if args.check:
        return 1
    args.file.write_text(new_text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
