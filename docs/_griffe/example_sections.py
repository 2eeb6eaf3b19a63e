"""Griffe extension for the docs build: read ``Example:`` sections as Google-style examples.

The project's docstrings use ``Example:`` (singular) with doctest lines. Griffe's Google parser only
treats ``Examples:`` as an examples section; ``Example:`` becomes an admonition whose ``>>>`` lines are
rendered as Markdown text (so ``x["a"][0]`` turns into a broken reference link). This extension renames
the section heading before parsing, so doctests are shown as code. Loaded from ``mkdocs.yml``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rewrite ``Example:`` headings to ``Examples:`` in every loaded docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
