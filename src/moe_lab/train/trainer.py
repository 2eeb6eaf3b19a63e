"""The training loop: :class:`MoETrainer`.

One optimizer step = ``grad_accum_steps`` micro-batches (forward under optional bf16 autocast, backward
of ``loss / grad_accum_steps``), gradient clipping, AdamW step, scheduled learning rate, and for
``load_balancing="aux_free_bias"`` a router-bias update from the step's routing. Everything else
(metrics.jsonl, console, progress bar, checkpoints, early stopping, analytics) is a callback.

Under ``torchrun`` (``WORLD_SIZE > 1``) the same loop runs on every rank with the helpers of
:mod:`moe_lab.train.distributed`: each rank trains on its slice of the global batch, and only rank 0
writes the run directory.

Example:
    >>> import torch
    >>> from moe_lab.models import MoEModel
    >>> from moe_lab.train import MoETrainer
    >>> model = MoEModel.from_preset("tiny")
    >>> data = torch.randint(0, model.config.vocab_size, (32, 16))
    >>> result = MoETrainer(model, console=False).train(data, max_steps=2, batch_size=8)
    >>> result.steps
    2
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_lab.nn.huge_pages import release_buffers
from moe_lab.parallel import (
    ParallelConfig,
    is_distributed_checkpoint,
)
from moe_lab.train import distributed as mdist
from moe_lab.train.batches import as_dataset, make_train_iterator
from moe_lab.train.callbacks import (
    Callback,
    CheckpointCallback,
    EarlyStopping,
    default_callbacks,
    resolve_callbacks,
)
from moe_lab.train.checkpoint import latest_checkpoint
from moe_lab.train.config import TrainConfig
from moe_lab.train.optim import build_optimizer
from moe_lab.train.persist import open_run_dir, restore_checkpoint, save_model_dir, save_trainer_checkpoint
from moe_lab.train.results import EvalResult, TrainingResult
from moe_lab.train.rundir import RunDir
from moe_lab.train.setup import (
    apply_model_overrides,
    check_seq_len,
    merge_train_kwargs,
    model_config_dict,
    resolve_device,
    save_tokenizer,
    seed_everything,
    total_steps,
)
from moe_lab.train.state import TrainState
from moe_lab.train.step import evaluate_lm_loss, train_step

__all__ = ["MoETrainer", "OptimizerFactory", "resolve_device", "save_tokenizer", "seed_everything"]

OptimizerFactory = Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]
"""Builds the optimizer of a run from the (plain, unwrapped) model and the train config."""


class MoETrainer:
    """Train a :class:`moe_lab.models.MoEModel` (or any module with the same forward contract).

    Args:
        model: the model; moved to ``config.device``.
        config: a :class:`TrainConfig`; keyword arguments (``max_steps=100, batch_size=8``) override it.
        run_dir: a run directory (path or :class:`RunDir`) for metrics.jsonl, checkpoints and summary.json;
            also taken from ``config.run_dir`` or ``config.runs_dir/config.name``. None = in memory only.
        callbacks: extra :class:`Callback` objects (run after the built-in ones).
        tokenizer: saved into the run directory (``tokenizer.json``) when given.
        run_config: the :class:`RunConfig` written as ``config.yaml`` (default: model + train sections).
        console: print log lines / a progress bar (built-in callbacks).
        overwrite: replace an existing run directory instead of refusing.
        parallel: data / expert parallelism under ``torchrun`` (default: ``run_config.parallel``); ignored
            in a single process.
        optimizer_factory: ``(model, train_config) -> torch.optim.Optimizer`` used instead of
            :func:`~moe_lab.train.optim.build_optimizer` (on a fresh start and on resume; in a distributed
            run it is called after parallelisation). Groups without ``base_lr`` get their ``lr`` as the
            peak of the schedule.

    Example:
        >>> import torch
        >>> from moe_lab.models import MoEModel
        >>> model = MoEModel.from_preset("tiny")
        >>> sgd = lambda m, cfg: torch.optim.SGD(m.parameters(), lr=cfg.learning_rate)
        >>> tr = MoETrainer(model, optimizer_factory=sgd, console=False)
        >>> data = torch.randint(0, model.config.vocab_size, (8, 16))
        >>> tr.train(data, max_steps=1, batch_size=4).steps, type(tr.optimizer).__name__
        (1, 'SGD')
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig | None = None,
        *,
        run_dir: str | os.PathLike[str] | RunDir | None = None,
        callbacks: Sequence[Callback] = (),
        tokenizer: Any = None,
        run_config: Any = None,
        console: bool = True,
        overwrite: bool = False,
        parallel: ParallelConfig | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        **train_kwargs: Any,
    ) -> None:
        self.config = merge_train_kwargs(config or TrainConfig(), train_kwargs)
        self.model = model
        self.optimizer_factory: OptimizerFactory = optimizer_factory or build_optimizer
        self.tokenizer = tokenizer
        self.run_config = run_config
        self.console = console
        self.overwrite = overwrite
        self.extra_callbacks = list(callbacks)
        self.callbacks: list[Callback] = []
        self._run_dir_arg = run_dir.path if isinstance(run_dir, RunDir) else run_dir
        self.run_dir: RunDir | None = run_dir if isinstance(run_dir, RunDir) else None
        self.state = TrainState()
        self.optimizer: torch.optim.Optimizer | None = None
        self.total_steps = 0
        self.summary_extra: dict[str, Any] = {}
        self.parallel = parallel or getattr(run_config, "parallel", None) or ParallelConfig()
        num_experts = getattr(getattr(model, "config", None), "num_experts", None)
        self.ctx = mdist.job_context(self.parallel, num_experts=num_experts, device=self.config.device)
        self.device = self.ctx.device
        self.model.to(self.device)
        self._wrapped: nn.Module | None = None  # the DDP / FSDP2 model of a distributed run
        self._fwd: nn.Module = self.model
        self._iter: Any = None
        self.resumed_from: Path | None = None

    @property
    def is_main_process(self) -> bool:
        """True in a single process and on rank 0: the process that writes the run directory."""
        return self.ctx.is_main

    # ---- setup -------------------------------------------------------------------------------------
    def _open_run_dir(self) -> None:
        open_run_dir(self)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """The run's optimizer over ``self.model`` (never the wrapper: state is keyed by parameter name)."""
        opt = self.optimizer_factory(self.model, self.config)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer_factory must return a torch.optim.Optimizer, got {type(opt).__name__}"
            )
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])  # the schedule's peak (see optim.set_lr)
        return opt

    def _parallelize(self, ckpt: Path | None) -> Any:
        """Distributed runs: load a single-file checkpoint into the plain model, then wrap it (once)."""
        preloaded = None
        if ckpt is not None and not is_distributed_checkpoint(ckpt):
            if self._wrapped is not None:
                raise ValueError("a single-file checkpoint must be loaded before the model is parallelised")
            preloaded = mdist.preload_single_file(
                ckpt,
                model=self.model,
                cfg=self.config,
                model_config=model_config_dict(self.model),
                device=self.device,
                optimizer_factory=self.optimizer_factory,
            )
        if self._wrapped is None:
            self._wrapped = mdist.parallelize(self.model, self.ctx, self.parallel.data_parallel)
        return preloaded

    def _data_seed(self) -> int:
        """Seed of the data order: the run config's ``data.seed`` when set, else ``train.seed``."""
        data = getattr(self.run_config, "data", None)
        seed = getattr(data, "seed", None)
        return int(seed) if seed is not None else int(self.config.seed)

    def _resume(self, ckpt: Path, preloaded: Any = None) -> None:
        restore_checkpoint(self, ckpt, preloaded)
        # only now that the checkpoint fits: a refused resume (changed model or data) leaves config.yaml as it was
        if self.run_dir is not None and self.is_main_process and self.run_config is not None:
            self.run_config.to_yaml(self.run_dir.config_path)

    # ---- public API --------------------------------------------------------------------------------
    def train(
        self,
        train_data: Any = None,
        eval_data: Any = None,
        *,
        resume_from: str | os.PathLike[str] | None = None,
        **train_kwargs: Any,
    ) -> TrainingResult:
        """Train until ``max_steps`` / ``num_epochs`` (whichever ends first) or a callback stops it.

        ``train_data``/``eval_data``: a dataset of ``[S]`` sequences (e.g. from :func:`moe_lab.data.
        build_datasets`), a ``[N, S]`` LongTensor or a list of token-id lists. ``resume_from``: a run
        directory or checkpoint to continue exactly. Keyword arguments override :class:`TrainConfig` fields.
        """
        self.config = merge_train_kwargs(self.config, train_kwargs)
        cfg = self.config
        if train_data is None:
            raise ValueError("train_data is required")
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = self.ctx.device if self.ctx.distributed else resolve_device(cfg.device)
        if self.ctx.distributed:
            mdist.check_batch_size(cfg.batch_size, self.ctx.world_size)
        train_ds = as_dataset(train_data, name="train_data")
        eval_ds = as_dataset(eval_data, name="eval_data") if eval_data is not None else None
        check_seq_len(self.model, train_ds, "train_data")
        apply_model_overrides(self.model, cfg)
        self.model.to(self.device)
        ckpt = latest_checkpoint(resume_from) if resume_from is not None else None
        if resume_from is not None and ckpt is None:
            raise FileNotFoundError(f"no complete checkpoint found under {resume_from}")
        preloaded = self._parallelize(ckpt) if self.ctx.distributed else None
        model = self._wrapped if self._wrapped is not None else self.model
        self._fwd = torch.compile(model) if cfg.compile else model  # type: ignore[assignment]
        self.optimizer = self._build_optimizer()  # after parallelisation, over the unwrapped model
        self._iter = make_train_iterator(train_ds, cfg.batch_size, seed=self._data_seed())
        self.total_steps = total_steps(self.config, self._iter)
        self.resumed_from = None
        if ckpt is not None:
            self._resume(ckpt, preloaded)
        else:
            self.state = TrainState()
            seed_everything(cfg.seed)
            self._open_run_dir()
        if self.is_main_process:
            self.callbacks = default_callbacks(self) + resolve_callbacks(cfg.callbacks) + self.extra_callbacks
        else:  # only what must run on every rank: the collective checkpoint save and the stop decision
            everywhere = (CheckpointCallback, EarlyStopping)
            self.callbacks = [
                c for c in default_callbacks(self) + self.extra_callbacks if isinstance(c, everywhere)
            ]
        self.eval_dataset = eval_ds

        t_start = time.perf_counter()
        session_tokens, session_time = 0, 0.0
        stopped_early = False
        last_eval_step = -1
        self._emit("on_train_begin", self)
        while self.state.step < self.total_steps:
            metrics, routing = self._train_step()
            session_tokens += metrics["step_tokens"]
            session_time += metrics["step_time_s"]
            step = self.state.step
            self._emit("on_routing", self, step, routing)
            if eval_ds is not None and cfg.eval_every and step % cfg.eval_every == 0:
                self._run_eval(eval_ds)
                last_eval_step = step
            self._emit("on_step_end", self, step, metrics)
            stop = any(cb.should_stop(self) for cb in self.callbacks)
            if self.ctx.distributed:
                stop = mdist.any_rank(stop, self.ctx)
            if stop:
                stopped_early = True
                break
        if eval_ds is not None and last_eval_step != self.state.step:
            self._run_eval(eval_ds)
        last = self.state.last_eval
        result = TrainingResult(
            final_loss=self.state.last_loss,
            final_lm_loss=getattr(self, "_last_lm_loss", None),
            eval_loss=last.get("eval_loss"),
            perplexity=last.get("perplexity"),
            steps=self.state.step,
            tokens=self.state.tokens_seen,
            tokens_per_s=session_tokens / session_time if session_time > 0 else 0.0,
            wall_time_s=time.perf_counter() - t_start,
            run_dir=str(self.run_dir.path) if self.run_dir is not None else None,
            stopped_early=stopped_early,
            extra=dict(self.summary_extra),
        )
        self._emit("on_train_end", self, result)
        if self.run_dir is not None and self.is_main_process:
            summary = result.to_dict()
            extra = summary.pop("extra")
            summary.update(extra)
            summary["total_steps"] = self.total_steps
            self.run_dir.write_summary(summary)
        release_buffers()  # the step's pooled temporaries are free now: give their memory back
        return result

    @torch.no_grad()
    def evaluate(
        self, data: Any, max_batches: int | None = None, batch_size: int | None = None
    ) -> EvalResult:
        """Mean next-token loss (nats/token, without router losses) and perplexity over ``data``."""
        ds = as_dataset(data, name="eval_data")
        return evaluate_lm_loss(self, ds, max_batches, batch_size or self.config.batch_size)

    def save_model(self, path: str | os.PathLike[str]) -> Path:
        """Save the model (``save_pretrained`` format) and the tokenizer into the folder ``path``."""
        return save_model_dir(self, path)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` (atomic), keep the last K, call ``on_checkpoint``."""
        return save_trainer_checkpoint(self)

    @classmethod
    def resume(cls, run_dir: str | os.PathLike[str], **kwargs: Any) -> TrainingResult:
        """Continue the run in ``run_dir`` (model, data and settings from its ``config.yaml``).

        Keyword arguments go to :func:`moe_lab.train.launch.resume_run` (``overrides``, ``callbacks``).
        """
        from moe_lab.train.launch import resume_run

        return resume_run(run_dir, **kwargs)

    # ---- internals ---------------------------------------------------------------------------------
    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _unpack(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        mask = batch.get("attention_mask")
        mask = mask.to(self.device, non_blocking=True) if mask is not None else None
        labels = batch.get("labels")
        labels = labels.to(self.device, non_blocking=True) if labels is not None else ids
        return ids, mask, labels

    def _train_step(self) -> tuple[dict[str, Any], list[Any]]:
        return train_step(self)

    def _run_eval(self, eval_ds: Any) -> EvalResult:
        res = self.evaluate(eval_ds, max_batches=self.config.eval_batches)
        st = self.state
        st.last_eval = {"eval_loss": res.loss, "perplexity": res.perplexity}
        if math.isfinite(res.loss) and (
            st.best_eval_loss is None or res.loss < st.best_eval_loss - self.config.early_stopping_min_delta
        ):
            st.best_eval_loss = res.loss
            st.evals_without_improvement = 0
        else:
            st.evals_without_improvement += 1
        metrics = {
            "step": st.step,
            "split": "val",
            "eval_loss": res.loss,
            "perplexity": res.perplexity,
            "eval_tokens": res.tokens,
        }
        self._emit("on_eval_end", self, st.step, metrics)
        return res
