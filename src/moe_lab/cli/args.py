"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse

__all__ = ["int_list"]


def int_list(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``; positive integers only (an argparse ``type=``).

    >>> int_list("2,4")
    [2, 4]
    """
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
