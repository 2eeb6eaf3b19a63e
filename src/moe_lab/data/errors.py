"""The one exception type of :mod:`moe_lab.data`.

Example:
    >>> from moe_lab.data.errors import DataError
    >>> isinstance(DataError("no text found in corpus/"), ValueError)
    True
"""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad data input: the message names the file (and line or field) and what was expected."""
