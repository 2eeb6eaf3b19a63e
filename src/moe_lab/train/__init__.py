"""Training: :class:`MoETrainer` (the loop), configs, checkpoints, run directories and callbacks.

Example:
    >>> import torch
    >>> from moe_lab.models import MoEModel
    >>> from moe_lab.train import MoETrainer
    >>> model = MoEModel.from_preset("tiny")
    >>> data = torch.randint(0, 256, (64, 32))
    >>> MoETrainer(model, console=False).train(data, max_steps=2, batch_size=8).steps
    2
"""

from moe_lab.train.callbacks import Callback
from moe_lab.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from moe_lab.train.config import RunConfig, TrainConfig
from moe_lab.train.launch import resume_run, train_from_config
from moe_lab.train.results import EvalResult, TrainingResult
from moe_lab.train.rundir import RunDir
from moe_lab.train.state import TrainState
from moe_lab.train.trainer import MoETrainer, OptimizerFactory

__all__ = [
    "Callback",
    "EvalResult",
    "MoETrainer",
    "OptimizerFactory",
    "RunConfig",
    "RunDir",
    "TrainConfig",
    "TrainState",
    "TrainingResult",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "resume_run",
    "save_checkpoint",
    "train_from_config",
]
