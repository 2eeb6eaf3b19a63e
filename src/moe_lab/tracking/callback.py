"""Where ``moe_lab.train.callbacks.registry`` looks up the ``run_store`` callback.

The class lives in :mod:`moe_lab.tracking.exporters.run_store` (one exporter per file); this module only
re-exports it under the path the registry names.

Example:
    >>> from moe_lab.tracking.callback import RunStoreCallback
    >>> RunStoreCallback.__module__
    'moe_lab.tracking.exporters.run_store'
"""

from __future__ import annotations

from moe_lab.tracking.exporters.run_store import RunStoreCallback

__all__ = ["RunStoreCallback"]
