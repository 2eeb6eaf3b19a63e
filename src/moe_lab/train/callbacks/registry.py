"""Callbacks by name, so ``train.callbacks: [router_monitor, {name: tensorboard, log_dir: tb}]`` works.

Names map lazily to ``"module:attribute"`` import paths: nothing is imported until a run asks for the
name, so optional dependencies (tensorboard, wandb, mlflow) cost nothing otherwise. The attribute is a
:class:`Callback` class or a factory; it is called with the spec's keyword arguments. A spec may also
be a full ``"package.module:Factory"`` path. Other packages add names with :func:`register_callback`.

Example:
    >>> from moe_lab.train.callbacks.registry import create_callback, register_callback
    >>> register_callback("my_stop", "moe_lab.train.callbacks.early_stopping:EarlyStopping")
    >>> create_callback({"name": "my_stop", "patience": 3}).patience
    3
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from moe_lab.config import ConfigError
from moe_lab.train.callbacks.base import Callback

__all__ = ["available_callbacks", "create_callback", "register_callback", "resolve_callbacks"]

_REGISTRY: dict[str, str | Callable[..., Callback]] = {
    "logging": "moe_lab.train.callbacks.logging:LoggingCallback",
    "checkpointing": "moe_lab.train.callbacks.checkpointing:CheckpointCallback",
    "progress": "moe_lab.train.callbacks.progress:ProgressCallback",
    "early_stopping": "moe_lab.train.callbacks.early_stopping:EarlyStopping",
    # Provided by the analytics / tracking packages (imported only when a run names them).
    "router_monitor": "moe_lab.train.callbacks.router_monitor:RouterMonitorCallback",
    "run_store": "moe_lab.tracking.exporters.run_store:RunStoreCallback",
    "tensorboard": "moe_lab.tracking.exporters.tensorboard:TensorBoardCallback",
    "wandb": "moe_lab.tracking.exporters.wandb:WandbCallback",
    "mlflow": "moe_lab.tracking.exporters.mlflow:MLflowCallback",
}


def register_callback(name: str, target: str | Callable[..., Callback]) -> None:
    """Register ``name`` -> ``"module:attribute"`` (imported lazily) or a factory/class."""
    if not name or ":" in name:
        raise ValueError(f"callback name must be a plain word, got {name!r}")
    _REGISTRY[name] = target


def available_callbacks() -> list[str]:
    """Registered names (whether or not their optional dependencies are installed)."""
    return sorted(_REGISTRY)


def _load(path: str, label: str) -> Callable[..., Callback]:
    module_name, _, attr = path.partition(":")
    if not attr:
        raise ConfigError(f"train.callbacks: '{label}' must be a registered name or 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"train.callbacks: callback '{label}' is not available ({err})") from None
    try:
        factory: Callable[..., Callback] = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"train.callbacks: callback '{label}': {module_name} has no '{attr}'") from None
    return factory


def create_callback(spec: str | dict[str, Any]) -> Callback:
    """Build one callback from a name, a ``module:attr`` path, or ``{"name": ..., **kwargs}``."""
    if isinstance(spec, dict):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"train.callbacks: entry {spec!r} needs a 'name'")
    else:
        name, kwargs = spec, {}
    target = _REGISTRY.get(name, name if ":" in name else None)
    if target is None:
        raise ConfigError(
            f"train.callbacks: unknown callback '{name}' (known: {', '.join(available_callbacks())})"
        )
    factory = _load(target, name) if isinstance(target, str) else target
    try:
        cb = factory(**kwargs)
    except TypeError as err:
        raise ConfigError(f"train.callbacks: bad arguments for '{name}': {err}") from None
    if not all(hasattr(cb, h) for h in ("on_step_end", "on_train_end")):
        raise ConfigError(f"train.callbacks: '{name}' did not produce a Callback (got {type(cb).__name__})")
    return cb


def resolve_callbacks(specs: Sequence[str | dict[str, Any]]) -> list[Callback]:
    """Build every callback named in ``train.callbacks``."""
    return [create_callback(s) for s in specs]
