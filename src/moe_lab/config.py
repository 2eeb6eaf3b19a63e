"""Validated configuration base class shared by every section of a moe-lab run.

Every section (``model``, ``data``, ``train``, ``parallel``, ...) is a subclass of :class:`Config`:
keyword-only, validated at construction, unknown keys rejected with the key's name, YAML in and out,
and dotted overrides (``model.num_experts=16``) as the CLI's ``--set`` uses them.

Example:
    >>> from moe_lab.config import Config
    >>> class Opt(Config):
    ...     lr: float = 1e-3
    ...     steps: int = 10
    >>> Opt().with_overrides(["steps=20"]).steps
    20
"""

from __future__ import annotations

import os
import tempfile
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

__all__ = [
    "Config",
    "ConfigError",
    "atomic_write_text",
    "parse_override_value",
    "type_juggling",
    "yaml_error_text",
]

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and what was expected."""


def _format_validation_error(cls_name: str, err: ValidationError, prefix: str = "") -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item.get("loc", ()))
        key = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or cls_name)
        kind = item.get("type", "")
        if kind == "extra_forbidden":
            lines.append(f"unknown key '{key}' in {cls_name}")
        elif kind == "missing":
            lines.append(f"missing required key '{key}' in {cls_name}")
        else:
            got = item.get("input")
            got_s = repr(got)
            if len(got_s) > 60:
                got_s = got_s[:57] + "..."
            msg = item.get("msg", "invalid value")
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            lines.append(f"{key}: {msg} (got {got_s})")
    return "; ".join(lines)


def yaml_error_text(err: Exception) -> str:
    """One line for a YAML (or decoding) error: the problem and where, e.g. ``mapping values are not allowed
    here (line 3, column 8)``; PyYAML's own text spans several lines.

    >>> try:
    ...     yaml.safe_load("a: 1\\nb: c: d\\n")
    ... except yaml.YAMLError as e:
    ...     print(yaml_error_text(e))
    mapping values are not allowed here (line 2, column 5)
    """
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(err).split())


def parse_override_value(text: str) -> Any:
    """Parse the value of a ``key=value`` override as YAML (``16`` -> int, ``true`` -> bool, ``[1,2]``...)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def scalar_kinds(annotation: Any) -> set[Any]:
    """The scalar types a field accepts: ``int | None`` -> {int, None}; a ``Literal`` counts as ``str``."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return set().union(*(scalar_kinds(a) for a in get_args(annotation)))
    if origin is Literal:
        return {type(a) for a in get_args(annotation)}
    return {origin or annotation}


def type_juggling(annotation: Any, value: Any) -> str | None:
    """What is wrong when ``value`` would only fit ``annotation`` by conversion, else None.

    pydantic's lax mode turns ``True`` into 1, ``"64"`` into 64 and ``"yes"`` into True; in a config these
    are almost always mistakes (a flag in the wrong key, a quoted number), so they are refused. Numeric
    strings stay valid for float fields: YAML 1.1 reads ``1e-3`` (no dot) as a string.

    >>> type_juggling(int, True), type_juggling(bool, "yes"), type_juggling(float, "1e-3")
    ('expected an integer, not a boolean', 'expected true or false, not a string', None)
    """
    kinds = scalar_kinds(annotation)
    if any(k not in (int, float, bool, str, type(None)) for k in kinds):
        return None  # lists, nested sections, ...: pydantic's own checks
    if isinstance(value, bool):
        if bool in kinds:
            return None
        if int in kinds and float not in kinds:
            return "expected an integer, not a boolean"
        if float in kinds:
            return "expected a number, not a boolean"
    elif isinstance(value, str):
        if str in kinds or float in kinds:
            return None
        if int in kinds:
            return "expected an integer, not a string"
        if bool in kinds:
            return "expected true or false, not a string"
    elif isinstance(value, (int, float)) and kinds & {int, float, str} == set() and bool in kinds:
        return "expected true or false, not a number"
    return None


class Config(BaseModel):
    """Base class of all configuration sections: validated, unknown keys are errors.

    Subclasses declare typed fields with defaults and may add ``@model_validator(mode="after")``
    checks that raise ``ValueError`` with a message naming the field.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, protected_namespaces=())

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(_format_validation_error(type(self).__name__, err)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise ConfigError(_format_validation_error(type(self).__name__, err)) from None

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_type_juggling(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        problem = type_juggling(field.annotation, value) if field is not None else None
        if problem:
            raise ValueError(problem)
        return value

    # ---- dict / YAML -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None) -> C:
        """Build from a plain dict (as read from YAML); errors name the offending key."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{cls.__name__}: expected a mapping of keys to values, got {type(data).__name__}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict of every field (defaults included)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_yaml(cls: type[C], path: str | os.PathLike[str]) -> C:
        """Read a YAML file. Missing file, bad YAML and bad values raise :class:`ConfigError`."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {yaml_error_text(err)}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{p}: {err}") from None

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """Return the YAML text; also write it atomically to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    # ---- overrides ---------------------------------------------------------------------------------
    def with_overrides(self: C, overrides: list[str] | dict[str, Any]) -> C:
        """Return a copy with dotted ``key=value`` overrides applied (values parsed as YAML).

        >>> # cfg.with_overrides(["model.num_experts=16", "train.max_steps=100"])
        """
        data = self.to_dict()
        items: list[tuple[str, Any]]
        if isinstance(overrides, dict):
            items = list(overrides.items())
        else:
            items = []
            for ov in overrides:
                if "=" not in ov:
                    raise ConfigError(f"override '{ov}' must look like key=value (e.g. model.num_experts=16)")
                key, _, raw = ov.partition("=")
                items.append((key.strip(), parse_override_value(raw.strip())))
        for key, value in items:
            parts = key.split(".")
            node: Any = data
            for i, part in enumerate(parts[:-1]):
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(f"unknown key '{'.'.join(parts[: i + 1])}' in override '{key}'")
                if node[part] is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, dict) or parts[-1] not in node:
                raise ConfigError(f"unknown key '{key}' in override")
            node[parts[-1]] = value
        return type(self).from_dict(data)
