"""Dashboard settings, from arguments or the environment (``MOE_LAB_DASHBOARD_*``).

==================================  ==========================================================
``MOE_LAB_DASHBOARD_RUNS_DIR``      runs directory to watch (its run dirs are imported into
                                    ``<runs dir>/runs.db`` incrementally)
``MOE_LAB_DASHBOARD_STORE_URL``     run store URL (else ``MOE_LAB_STORE_URL``); may hold a password
``MOE_LAB_DASHBOARD_HOST``          bind address (default ``127.0.0.1``: this machine only)
``MOE_LAB_DASHBOARD_PORT``          port (default 8080)
``MOE_LAB_DASHBOARD_POLL_MS``       how often the page asks for new steps (default 2000)
``MOE_LAB_DASHBOARD_SYNC_S``        least seconds between two imports of the runs directory (1.0)
``MOE_LAB_DASHBOARD_MAX_POINTS``    most points per curve / heatmap columns sent to the page (400)
==================================  ==========================================================

Example:
    >>> from moe_lab.dashboard.settings import DashboardSettings
    >>> DashboardSettings.from_env({}).host
    '127.0.0.1'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr

from moe_lab.config import Config, ConfigError, parse_override_value, scalar_kinds

__all__ = ["ENV_PREFIX", "DashboardSettings"]

ENV_PREFIX = "MOE_LAB_DASHBOARD_"
_ENV_FIELDS = {
    "RUNS_DIR": "runs_dir",
    "STORE_URL": "store_url",
    "HOST": "host",
    "PORT": "port",
    "POLL_MS": "poll_ms",
    "SYNC_S": "sync_interval_s",
    "MAX_POINTS": "max_points",
}


def _env_value(cls: type[Config], name: str, text: str) -> Any:
    """An environment variable's text as the field's type: numbers and flags are parsed (YAML: ``9001``,
    ``true``), text fields (host, URL, path) are kept exactly as written."""
    field = cls.model_fields.get(name)
    kinds = scalar_kinds(field.annotation) if field is not None else set()
    if kinds and kinds <= {int, float, bool, type(None)}:
        return parse_override_value(text)
    return text


class DashboardSettings(Config):
    """Where the dashboard reads runs from and how it serves them."""

    runs_dir: Path | None = None
    """Runs directory whose run folders (``metrics.jsonl`` ...) are imported into the store."""
    store_url: SecretStr | None = None
    """Run store URL; default ``<runs_dir>/runs.db`` (or ``$MOE_LAB_STORE_URL`` without a runs dir)."""
    host: str = "127.0.0.1"
    """Bind address. Anything other than loopback exposes your runs to the network."""
    port: int = Field(default=8080, ge=0, le=65535)
    """TCP port (0: any free port)."""
    poll_ms: int = Field(default=2000, ge=100)
    """Page refresh period for live runs, in milliseconds."""
    sync_interval_s: float = Field(default=1.0, ge=0.0)
    """Least time between two imports of the runs directory (0: on every request)."""
    max_points: int = Field(default=400, ge=10)
    """Most points per curve (and heatmap columns) sent to the page; longer runs are subsampled."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> DashboardSettings:
        """Settings from ``MOE_LAB_DASHBOARD_*`` variables, then ``overrides`` (None values ignored)."""
        env = os.environ if env is None else env
        data: dict[str, Any] = {}
        for suffix, name in _ENV_FIELDS.items():
            value = env.get(ENV_PREFIX + suffix)
            if value not in (None, ""):
                data[name] = _env_value(cls, name, value)
        if "store_url" not in data and "runs_dir" not in data and env.get("MOE_LAB_STORE_URL"):
            data["store_url"] = env["MOE_LAB_STORE_URL"]
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"dashboard settings: {err}") from None

    def resolved_store_url(self) -> str | None:
        """The store URL to open (secret revealed; never log it), or None for an in-memory store."""
        if self.store_url is not None:
            return self.store_url.get_secret_value()
        if self.runs_dir is not None:
            return f"sqlite:///{Path(self.runs_dir).expanduser().resolve() / 'runs.db'}"
        return os.environ.get("MOE_LAB_STORE_URL") or "sqlite:///runs/runs.db"
