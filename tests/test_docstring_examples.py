"""Every docstring example in the package runs and prints what it shows (doctest, module by module)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import moe_lab

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(moe_lab.__path__, "moe_lab.") if not m.name.endswith("__main__")
)


def test_the_package_has_modules() -> None:
    assert "moe_lab.nn.experts" in MODULES and "moe_lab.train.trainer" in MODULES


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see the output above)"
