"""``tensorboard`` callback: scalars, per-layer expert-load histograms and a load heatmap image.

Writes event files under ``<run dir>/tensorboard`` (or ``log_dir``); view them with
``tensorboard --logdir runs/<name>/tensorboard``. Needs the ``tensorboard`` package (``moe-lab[track]``).

Example:
    >>> from moe_lab.tracking.exporters.tensorboard import TensorBoardCallback, load_heatmap_image
    >>> load_heatmap_image([[0.5, 0.5], [1.0, 0.0]], cell=2).shape
    (4, 4, 3)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moe_lab.tracking.exporters._common import run_identity, scalar_metrics
from moe_lab.train.callbacks.base import Callback

__all__ = ["TensorBoardCallback", "load_heatmap_image"]

# viridis anchor colours (0, .25, .5, .75, 1), interpolated linearly
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def load_heatmap_image(loads: list[list[float]], cell: int = 16) -> np.ndarray:
    """An ``[H, W, 3]`` uint8 image of ``loads[layer][expert]`` (rows: layers, columns: experts), each value
    scaled by the row maximum and coloured with viridis, each cell ``cell`` x ``cell`` pixels."""
    n_e = max((len(r) for r in loads), default=0)
    z = np.zeros((len(loads), n_e), dtype=np.float64)
    for i, row in enumerate(loads):
        z[i, : len(row)] = row
    peak = z.max(axis=1, keepdims=True)
    z = np.divide(z, peak, out=np.zeros_like(z), where=peak > 0)
    pos = z * (len(_VIRIDIS) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(_VIRIDIS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac
    img = np.kron(rgb, np.ones((cell, cell, 1)))
    return img.round().astype(np.uint8)


class TensorBoardCallback(Callback):
    """Log to TensorBoard.

    Args:
        log_dir: where event files go (default ``<run dir>/tensorboard``, or ``runs/tensorboard/<name>``).
        every: log every N-th step.
        image_every: add the expert-load heatmap image every N-th logged step (0: never).
    """

    def __init__(self, log_dir: str | None = None, every: int = 1, image_every: int = 50) -> None:
        if every < 1 or image_every < 0:
            raise ValueError(
                f"tensorboard: 'every' must be >= 1 and 'image_every' >= 0 (got {every}, {image_every})"
            )
        self.log_dir, self.every, self.image_every = log_dir, every, image_every
        self.writer: Any = None
        self._logged = 0

    def on_train_begin(self, trainer: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        ident = run_identity(trainer)
        if self.log_dir is not None:
            log_dir = Path(self.log_dir)
        elif ident.run_dir is not None:
            log_dir = ident.run_dir / "tensorboard"
        else:
            log_dir = Path("runs") / "tensorboard" / ident.name
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.log_dir = str(log_dir)

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        if self.writer is None or step % self.every:
            return
        self._logged += 1
        for key, value in scalar_metrics(metrics).items():
            self.writer.add_scalar(f"train/{key}", value, step)
        loads = metrics.get("expert_load") or []
        for layer, row in enumerate(loads):
            if not row:
                continue
            values = np.asarray(row, dtype=np.float64)
            experts = np.arange(len(values), dtype=np.float64)
            # one bucket per expert: the histogram's height at expert e is that expert's load
            self.writer.add_histogram_raw(
                f"expert_load/layer{layer}",
                min=0.0,
                max=float(len(values)),
                num=float(values.sum()),
                sum=float((values * experts).sum()),
                sum_squares=float((values * experts**2).sum()),
                bucket_limits=(experts + 1).tolist(),
                bucket_counts=values.tolist(),
                global_step=step,
            )
            self.writer.add_scalar(f"expert_load/layer{layer}_max", float(values.max()), step)
        if loads and self.image_every and (self._logged - 1) % self.image_every == 0:  # first, then every N
            self.writer.add_image("expert_load/heatmap", load_heatmap_image(loads), step, dataformats="HWC")

    def on_eval_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        split = str(metrics.get("split", "val"))
        for key, value in scalar_metrics(metrics).items():
            self.writer.add_scalar(f"{split}/{key}", value, step)

    def on_train_end(self, trainer: Any, result: Any) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
