"""List the runtime dependency closure of moe-lab from the installed environment.

"Runtime" means the base dependencies plus the user-facing extras (not dev/docs tools), resolved
transitively through the metadata of what is installed. Used by `make audit` (pip-audit on
exactly these pins) and `make licenses` (pip-licenses on exactly these names).

Usage:
    python .ci/runtime_deps.py --format requirements      # name==version lines
    python .ci/runtime_deps.py --format names             # one name per line
    python .ci/runtime_deps.py --extras hf,serve --format names
    python .ci/runtime_deps.py --check-licenses .ci/license-allowlist.txt
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT_DIST = "moe-lab"
RUNTIME_EXTRAS = ("hf", "serve", "viz", "track", "export")


def _requirements(dist: metadata.Distribution, extras: set[str]) -> list[Requirement]:
    reqs = []
    for line in dist.requires or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is None:
            reqs.append(req)
            continue
        envs = [{"extra": e} for e in extras] or [{"extra": ""}]
        if any(req.marker.evaluate(env) for env in envs):
            reqs.append(req)
    return reqs


def runtime_closure(root: str = ROOT_DIST, extras: tuple[str, ...] = RUNTIME_EXTRAS) -> dict[str, str]:
    """Map canonical name -> installed version for `root[extras]` and everything it pulls in.

    A requirement whose distribution is not installed is an error: the closure would be incomplete.
    """
    found: dict[str, str] = {}
    # (distribution name, extras requested of it); the root's self-referencing extras are expanded.
    queue: list[tuple[str, set[str]]] = [(root, set(extras))]
    seen: set[tuple[str, frozenset[str]]] = set()
    missing: list[str] = []
    while queue:
        name, want = queue.pop()
        key = (canonicalize_name(name), frozenset(want))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        canon = canonicalize_name(dist.metadata["Name"])
        if canon != canonicalize_name(root):
            found[canon] = dist.version
        for req in _requirements(dist, want):
            queue.append((req.name, set(req.extras)))
    if missing:
        raise SystemExit(
            f"runtime_deps: not installed: {', '.join(sorted(set(missing)))} "
            "(run `make install` first; the closure would be incomplete)"
        )
    return dict(sorted(found.items()))


def _load_allowlist(path: Path) -> tuple[set[str], dict[str, str]]:
    """Allowed license names (case-insensitive) and per-package exceptions (`package: NAME  # why`)."""
    licenses: set[str] = set()
    packages: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line, _, why = raw.partition("#")
        line = line.strip()
        if not line:
            continue
        if line.startswith("package:"):
            name = line.removeprefix("package:").strip()
            if not why.strip():
                raise SystemExit(f"{path}: package exception {name!r} needs a reason after '#'")
            packages[canonicalize_name(name)] = why.strip()
        else:
            licenses.add(line.casefold())
    return licenses, packages


def license_allowed(expression: str, allowed: set[str]) -> bool:
    """True if a license string is acceptable under the allow-list.

    `A OR B` (and classifier lists `A; B`, which name alternative licenses) need one allowed
    alternative; `A AND B` needs every part allowed. Parentheses are ignored (no nesting here).
    """
    text = (
        expression.replace("(", " ").replace(")", " ")
        if " OR " in expression or " AND " in expression
        else expression
    )
    alternatives = [a for part in text.split(";") for a in re.split(r"\s+OR\s+", part)]
    for alt in alternatives:
        parts = [p.strip() for p in re.split(r"\s+AND\s+", alt) if p.strip()]
        if parts and all(p.casefold() in allowed for p in parts):
            return True
    return False


def check_licenses(allowlist: Path, extras: tuple[str, ...]) -> int:
    """Run pip-licenses on the runtime closure; print and fail on any license outside the allow-list."""
    allowed, exceptions = _load_allowlist(allowlist)
    names = list(runtime_closure(extras=extras))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "piplicenses",
            "--from=mixed",
            "--with-system",
            "--format=json",
            "--packages",
            *names,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = json.loads(out)
    reported = {canonicalize_name(r["Name"]) for r in rows}
    bad = []
    for row in rows:
        name = canonicalize_name(row["Name"])
        if name in exceptions or license_allowed(row["License"], allowed):
            continue
        bad.append(f"  {row['Name']} {row['Version']}: {row['License']!r}")
    unreported = sorted(set(names) - reported)
    if unreported:
        bad.extend(f"  {n}: not reported by pip-licenses" for n in unreported)
    print(f"licenses: {len(rows)} runtime packages checked against {allowlist}")
    if bad:
        print("licenses: not on the allow-list (add the license, or a `package:` exception with a reason):")
        print("\n".join(bad))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=["requirements", "names"], default="requirements")
    parser.add_argument(
        "--extras",
        default=",".join(RUNTIME_EXTRAS),
        help=f"comma-separated extras of {ROOT_DIST} counted as runtime (default: %(default)s)",
    )
    parser.add_argument("--check-licenses", type=Path, metavar="ALLOWLIST", help="check licenses instead")
    args = parser.parse_args(argv)
    extras = tuple(e for e in args.extras.split(",") if e)
    if args.check_licenses:
        return check_licenses(args.check_licenses, extras)
    closure = runtime_closure(extras=extras)
    for name, version in closure.items():
        # Advisories are published per public release: audit torch 2.13.0+cpu as torch 2.13.0.
        public = version.split("+", 1)[0]
        print(f"{name}=={public}" if args.format == "requirements" else name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
