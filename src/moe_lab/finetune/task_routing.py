"""Task-adaptive routing: a learned per-task vector added to every router's input.

:func:`enable_task_routing` gives an existing model ``num_tasks`` task embeddings (zero-initialised, so the
model's outputs are unchanged until it is fine-tuned); fine-tune with examples that carry a ``task`` (see
:mod:`moe_lab.finetune.instruct`) through :class:`~moe_lab.finetune.FineTuner`: the dataset's ``task_ids``
reach the model's forward through the trainer's batches; then :func:`generate_for_task` conditions generation on a task and :func:`task_expert_load` shows
how routing differs per task.

Example:
    >>> import torch
    >>> from moe_lab.models import MoEModel
    >>> model = enable_task_routing(MoEModel.from_preset("tiny"), ["summarise", "translate"])
    >>> model.config.num_tasks
    2
    >>> ids = torch.randint(0, model.config.vocab_size, (1, 4))
    >>> model(ids, task_ids=torch.tensor([1])).logits.shape[-1] == model.config.vocab_size
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moe_lab.models import MoEModel

__all__ = ["enable_task_routing", "generate_for_task", "task_expert_load", "task_id_of"]


def enable_task_routing(model: MoEModel, tasks: int | Sequence[str]) -> MoEModel:
    """Add task embeddings to ``model`` in place (``config.num_tasks`` updated) and return it.

    ``tasks`` is a count or a list of task names (kept as ``model.task_names`` for :func:`task_id_of`).
    The new ``task_embed`` weight starts at zero; a model that already has task routing is an error.
    """
    names = None if isinstance(tasks, int) else [str(t) for t in tasks]
    n = tasks if isinstance(tasks, int) else len(tasks)
    if n < 1:
        raise ValueError(f"tasks: need at least one task, got {tasks!r}")
    if names is not None and len(set(names)) != n:
        raise ValueError(f"tasks: names must be unique, got {names}")
    cfg = model.config
    if getattr(model, "task_embed", None) is not None:
        raise ValueError(f"the model already has task routing (num_tasks={cfg.num_tasks})")
    ref = model.embed_tokens.weight
    embed = nn.Embedding(n, cfg.hidden_size, device=ref.device, dtype=ref.dtype)
    nn.init.zeros_(embed.weight)
    model.task_embed = embed
    model.config = type(cfg)(**{**cfg.to_dict(), "num_tasks": n})
    model.task_names = names  # type: ignore[assignment]
    return model


def task_id_of(model: MoEModel, task: int | str) -> int:
    """Resolve a task name (or check an id) against the model's tasks."""
    n = int(model.config.num_tasks)
    if n == 0:
        raise ValueError("the model has no task routing (config.num_tasks=0); call enable_task_routing first")
    if isinstance(task, str):
        names = getattr(model, "task_names", None) or []
        if task not in names:
            raise ValueError(f"unknown task {task!r}; known: {names}")
        return names.index(task)
    if not 0 <= int(task) < n:
        raise ValueError(f"task id {task} out of range [0, {n})")
    return int(task)


def generate_for_task(
    model: MoEModel,
    prompt_ids: Tensor | Sequence[int] | Sequence[Sequence[int]],
    task: int | str,
    **settings: Any,
) -> Any:
    """:func:`moe_lab.inference.generate.generate` with every row routed as ``task``.

    ``settings`` are generation settings (``max_new_tokens=``, ``temperature=``, ``seed=``...).
    """
    from moe_lab.inference.generate import generate

    tid = task_id_of(model, task)
    if isinstance(prompt_ids, Tensor):
        rows = 1 if prompt_ids.dim() == 1 else int(prompt_ids.shape[0])
    else:
        rows = len(prompt_ids) if prompt_ids and isinstance(prompt_ids[0], (list, tuple)) else 1
    device = next(model.parameters()).device
    task_ids = torch.full((rows,), tid, dtype=torch.long, device=device)
    return generate(model, prompt_ids, task_ids=task_ids, **settings)


@torch.no_grad()
def task_expert_load(model: MoEModel, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Fraction of routed slots per expert for each task on the same inputs: ``[num_tasks, L, E]``
    (L = MoE layers). Rows differ only through the task embedding."""
    n = int(model.config.num_tasks)
    if n == 0:
        raise ValueError("the model has no task routing (config.num_tasks=0)")
    was = model.training
    model.eval()
    out = []
    try:
        for t in range(n):
            task_ids = torch.full((input_ids.shape[0],), t, dtype=torch.long, device=input_ids.device)
            res = model(input_ids, attention_mask=attention_mask, task_ids=task_ids)
            layers = []
            for d in res.routing:
                counts = d.tokens_per_expert.float()
                layers.append(counts / counts.sum().clamp(min=1))
            out.append(torch.stack(layers))
    finally:
        model.train(was)
    return torch.stack(out)
