"""The documentation site builds offline with `mkdocs build --strict` (what `make docs` and docs.yml run)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # ~10-30 s: mkdocstrings renders the whole API


def _nav_files(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in _nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in _nav_files(value)]
    return []


class _Loader(yaml.SafeLoader):
    """mkdocs.yml uses `!relative`; it is irrelevant to the nav check."""


_Loader.add_constructor("!relative", lambda loader, node: loader.construct_scalar(node))


def test_every_nav_page_exists(repo: Path) -> None:
    config = yaml.load((repo / "mkdocs.yml").read_text(), Loader=_Loader)
    missing = [f for f in _nav_files(config["nav"]) if not (repo / "docs" / f).is_file()]
    assert not missing, f"pages in mkdocs.yml nav but not under docs/: {missing}"


def test_docs_build_strict_offline(repo: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (site / "index.html").is_file()
    assert (site / "workflows" / "ci" / "index.html").is_file()
    reference = (site / "reference" / "moe_lab" / "index.html").read_text(encoding="utf-8")
    assert "RoutingDecision" in reference, "mkdocstrings did not render the API reference"
    # Nothing on the pages is fetched from the network: no web fonts, no external scripts or styles.
    # (<link rel="canonical"> names the public URL but fetches nothing, so only loading tags count.)
    external = re.compile(
        r"""<script[^>]+src=["']https?://|<link[^>]+rel=["'](?:stylesheet|preconnect|preload|icon)["'][^>]+href=["']https?://""",
        re.IGNORECASE,
    )
    offenders = [
        str(page.relative_to(site))
        for page in site.rglob("*.html")
        if external.search(page.read_text(encoding="utf-8"))
    ]
    assert not offenders, f"pages load external resources: {offenders[:5]}"
