"""The examples in the docstrings of moe_lab.data run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "moe_lab.data",
    "moe_lab.data.build",
    "moe_lab.data.config",
    "moe_lab.data.corpus",
    "moe_lab.data.datasets",
    "moe_lab.data.errors",
    "moe_lab.data.packing",
    "moe_lab.data.sources",
    "moe_lab.data.streaming",
    "moe_lab.data.tokenizers",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0
