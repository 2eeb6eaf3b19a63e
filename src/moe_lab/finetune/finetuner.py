"""``FineTuner``: fine-tune an (imported) MoE model with the regular trainer, plus fine-tuning controls.

On top of :class:`~moe_lab.train.MoETrainer` (so checkpoints, resume, metrics.jsonl and routing statistics
work unchanged) it adds:

* separate learning rates for routers, routed experts and everything else (optimizer parameter groups
  ``router``, ``experts``, ``decay``, ``no_decay``);
* freezing by group name (``experts``, ``shared_experts``, ``router``, ``attention``, ``embeddings``,
  ``lm_head``, ``norms``, ``dense_ffn``, ``task_embed``) or by glob over parameter names (``layers.0.*``);
* optional LoRA (:mod:`moe_lab.finetune.lora`);
* instruction data with response-only loss (:mod:`moe_lab.finetune.instruct`) and per-example task ids
  for task-adaptive routing (the items' ``task_ids`` reach the model's forward through the trainer).

The fine-tuning optimizer is given to the trainer as its ``optimizer_factory``, so a resumed fine-tune
rebuilds the same parameter groups.

Example:
    >>> import torch
    >>> from moe_lab.models import MoEModel
    >>> from moe_lab.finetune import FineTuner, FineTuneConfig
    >>> model = MoEModel.from_preset("tiny")
    >>> ft = FineTuner(model, FineTuneConfig(freeze=["embeddings", "attention"]), console=False)
    >>> data = torch.randint(0, model.config.vocab_size, (16, 16))
    >>> ft.train(data, max_steps=2, batch_size=4).steps
    2
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from moe_lab.config import Config
from moe_lab.finetune.instruct import InstructDataset, InstructExample
from moe_lab.finetune.lora import LoRAConfig, MoELoRA, apply_lora
from moe_lab.train import Callback, MoETrainer, TrainConfig, TrainingResult
from moe_lab.train.optim import adamw, param_groups

__all__ = ["FREEZE_GROUPS", "FineTuneConfig", "FineTuner", "freeze_parameters", "matches_group"]

FREEZE_GROUPS = (
    "experts",
    "shared_experts",
    "router",
    "attention",
    "embeddings",
    "lm_head",
    "norms",
    "dense_ffn",
    "task_embed",
)


def matches_group(name: str, group: str) -> bool:
    """Whether parameter ``name`` belongs to a freeze ``group`` (or matches it as a glob)."""
    dotted = f".{name}."
    leaf_module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    if group == "experts":
        return ".mlp.experts." in dotted
    if group == "shared_experts":
        return ".shared_experts." in dotted or ".shared_expert_gate." in dotted
    if group == "router":
        return ".router." in dotted
    if group == "attention":
        return ".self_attn." in dotted
    if group == "embeddings":
        return name.startswith("embed_tokens.")
    if group == "lm_head":
        return name.startswith("lm_head.")
    if group == "task_embed":
        return name.startswith("task_embed.")
    if group == "norms":
        return "norm" in leaf_module
    if group == "dense_ffn":
        return any(f".mlp.{p}." in dotted for p in ("gate_proj", "up_proj", "down_proj"))
    return fnmatch.fnmatchcase(name, group)


def freeze_parameters(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set ``requires_grad=False`` on every parameter matched by a group name or glob; returns their names.

    A pattern that matches nothing is an error (a typo would otherwise silently train everything).
    """
    frozen: list[str] = []
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        hit = [n for n in names if matches_group(n, pattern)]
        if not hit:
            groups = ", ".join(FREEZE_GROUPS)
            raise ValueError(f"freeze: {pattern!r} matches no parameter (groups: {groups}; or a glob)")
        frozen += hit
    params = dict(model.named_parameters())
    for n in set(frozen):
        params[n].requires_grad_(False)
    return sorted(set(frozen))


class FineTuneConfig(Config):
    """What to train and how fast, on top of :class:`~moe_lab.train.TrainConfig`."""

    learning_rate: float = Field(default=1e-4, gt=0)
    """Peak rate of everything except routers and routed experts."""
    router_learning_rate: float | None = Field(default=None, gt=0)
    """Peak rate of the router gates (None = learning_rate)."""
    expert_learning_rate: float | None = Field(default=None, gt=0)
    """Peak rate of the routed experts, including their LoRA adapters (None = learning_rate)."""
    freeze: list[str] = Field(default_factory=list)
    """Groups (experts, shared_experts, router, attention, embeddings, lm_head, norms, dense_ffn,
    task_embed) or globs over parameter names to freeze."""
    freeze_experts: bool = False
    """Shorthand for adding "experts" to ``freeze``."""
    lora: LoRAConfig | None = None
    """Train LoRA adapters instead of the full weights (the base is frozen)."""
    pad_token_id: int = Field(default=0, ge=0)
    """Padding id for instruction examples (masked out of attention and loss)."""

    @field_validator("freeze")
    @classmethod
    def _groups(cls, value: list[str]) -> list[str]:
        for g in value:
            if g not in FREEZE_GROUPS and not any(ch in g for ch in "*?[."):
                raise ValueError(f"unknown group {g!r}; expected one of {list(FREEZE_GROUPS)} or a glob")
        return value


def _is_expert_param(name: str) -> bool:
    return ".mlp.experts." in f".{name}."


def build_finetune_optimizer(model: nn.Module, train: TrainConfig, ft: FineTuneConfig) -> torch.optim.AdamW:
    """AdamW with groups ``router``, ``experts``, ``decay``, ``no_decay`` (frozen parameters left out)."""
    groups = param_groups(model)
    router_lr = ft.router_learning_rate or ft.learning_rate
    expert_lr = ft.expert_learning_rate or ft.learning_rate
    split: dict[str, tuple[list[nn.Parameter], float, float]] = {
        "decay": ([], ft.learning_rate, train.weight_decay),
        "no_decay": ([], ft.learning_rate, 0.0),
        "router": ([], router_lr, 0.0),
        "experts": ([], expert_lr, train.weight_decay),
    }
    for gname, params in groups.items():
        for name, p in params:
            target = "experts" if gname == "decay" and _is_expert_param(name) else gname
            split[target][0].append(p)
    out = [
        {"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd, "name": name}
        for name, (ps, lr, wd) in split.items()
        if ps
    ]
    if not out:
        raise ValueError("nothing to train: every parameter is frozen")
    return adamw(out, lr=ft.learning_rate, betas=train.betas, eps=train.eps)


class _SaveLoRAConfig(Callback):
    """Writes ``adapter_config.json`` into the run directory, so the run's checkpoints (which hold the
    LoRA-wrapped model) can be rebuilt by :func:`moe_lab.interop.rundir.load_run_model`."""

    def __init__(self, lora: MoELoRA) -> None:
        self.lora = lora

    def on_train_begin(self, trainer: Any) -> None:
        if trainer.run_dir is not None:
            self.lora.save_config(trainer.run_dir.path)


class FineTuner:
    """Fine-tune ``model`` with :class:`~moe_lab.train.MoETrainer` plus freezing, LR groups and LoRA.

    Args:
        model: an :class:`~moe_lab.models.MoEModel` (e.g. from :func:`moe_lab.interop.load_pretrained`).
        config: a :class:`FineTuneConfig` (learning rates, freezing, LoRA).
        train_config: the trainer's :class:`~moe_lab.train.TrainConfig` (steps, batch, schedule, run dir...);
            ``learning_rate``/``router_learning_rate`` there are replaced by the fine-tuning ones.
        run_dir, tokenizer, callbacks, console, overwrite: passed to the trainer.
        train_kwargs: TrainConfig fields (``max_steps=100, batch_size=8``).
    """

    def __init__(
        self,
        model: nn.Module,
        config: FineTuneConfig | None = None,
        *,
        train_config: TrainConfig | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        tokenizer: Any = None,
        callbacks: Sequence[Any] = (),
        console: bool = True,
        overwrite: bool = False,
        **train_kwargs: Any,
    ) -> None:
        self.config = config or FineTuneConfig()
        self.model = model
        self.lora: MoELoRA | None = None
        if self.config.lora is not None:
            self.lora = apply_lora(model, self.config.lora)
        patterns = list(self.config.freeze) + (["experts"] if self.config.freeze_experts else [])
        self.frozen = freeze_parameters(model, patterns) if patterns else []
        tc = train_config or TrainConfig()
        tc = TrainConfig.from_dict(
            {
                **tc.to_dict(),
                "learning_rate": self.config.learning_rate,
                "router_learning_rate": self.config.router_learning_rate,
            }
        )
        extra = [_SaveLoRAConfig(self.lora)] if self.lora is not None else []
        self.trainer = MoETrainer(
            model,
            tc,
            optimizer_factory=self._factory,
            run_dir=run_dir,
            callbacks=[*extra, *callbacks],
            tokenizer=tokenizer,
            console=console,
            overwrite=overwrite,
            **train_kwargs,
        )

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def _data(self, data: Any) -> Any:
        if isinstance(data, (list, tuple)) and data and isinstance(data[0], InstructExample):
            return InstructDataset(data, pad_id=self.config.pad_token_id)
        return data

    def _factory(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
        return build_finetune_optimizer(model, cfg, self.config)

    def train(
        self,
        train_data: Any,
        eval_data: Any = None,
        *,
        resume_from: str | os.PathLike[str] | None = None,
        **train_kwargs: Any,
    ) -> TrainingResult:
        """Train (see :meth:`moe_lab.train.MoETrainer.train`); lists of :class:`InstructExample` are
        padded into an :class:`InstructDataset`."""
        return self.trainer.train(
            self._data(train_data),
            self._data(eval_data) if eval_data is not None else None,
            resume_from=resume_from,
            **train_kwargs,
        )

    def evaluate(self, data: Any, max_batches: int | None = None, batch_size: int | None = None) -> Any:
        """Validation loss / perplexity (response tokens only for instruction data)."""
        return self.trainer.evaluate(self._data(data), max_batches=max_batches, batch_size=batch_size)

    def save_adapter(self, out_dir: str | os.PathLike[str]) -> Any:
        """Save the LoRA adapter (requires ``config.lora``)."""
        if self.lora is None:
            raise ValueError("save_adapter: this FineTuner has no LoRA (set FineTuneConfig.lora)")
        return self.lora.save_adapter(out_dir)
