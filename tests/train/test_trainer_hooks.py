"""Trainer hooks used by fine-tuning: ``optimizer_factory`` (fresh start and resume) and ``task_ids``
carried from the dataset items through the batches to the model's forward (train step and evaluation)."""

from __future__ import annotations

import pytest
import torch

from moe_lab.train import Callback, MoETrainer
from moe_lab.train.batches import collate


class LossRecorder(Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.lrs: dict[int, float] = {}
        self.stop_at = stop_at

    def on_step_end(self, trainer, step, metrics):
        self.losses[step] = metrics["loss"]
        self.lrs[step] = metrics["lr"]

    def should_stop(self, trainer):
        return self.stop_at is not None and trainer.state.step >= self.stop_at


class SGDFactory:
    """Records its calls; builds SGD with momentum (so the optimizer state matters on resume)."""

    def __init__(self, lr: float = 0.05) -> None:
        self.lr = lr
        self.calls: list[tuple[int, int]] = []  # (id(model), max_steps of the config it got)

    def __call__(self, model, cfg):
        self.calls.append((id(model), cfg.max_steps))
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)


def test_optimizer_factory_on_train_and_resume(tmp_path, make_tiny_model, make_data):
    data = make_data(n=24, seq=16)
    kw = {"max_steps": 6, "batch_size": 4, "checkpoint_every": 3, "lr_schedule": "constant", "seed": 1}
    kw["warmup_steps"] = 0

    full, f_full = LossRecorder(), SGDFactory()
    m_full = make_tiny_model(seed=0)
    tr = MoETrainer(
        m_full, run_dir=tmp_path / "full", callbacks=[full], console=False, optimizer_factory=f_full
    )
    tr.train(data, **kw)
    assert isinstance(tr.optimizer, torch.optim.SGD)
    assert f_full.calls == [(id(m_full), 6)]  # once, with the plain model and the run's config
    assert set(full.lrs.values()) == {0.05}  # the factory's lr is the schedule's peak (base_lr)

    first, f_a = LossRecorder(stop_at=3), SGDFactory()
    MoETrainer(
        make_tiny_model(seed=0),
        run_dir=tmp_path / "split",
        callbacks=[first],
        console=False,
        optimizer_factory=f_a,
    ).train(data, **kw)
    assert len(f_a.calls) == 1

    second, f_b = LossRecorder(), SGDFactory()
    m_b = make_tiny_model(seed=7)
    tr_b = MoETrainer(m_b, callbacks=[second], console=False, optimizer_factory=f_b)
    tr_b.train(data, resume_from=tmp_path / "split", **kw)
    assert f_b.calls == [(id(m_b), 6)]  # the resume path builds the optimizer with the factory too
    assert isinstance(tr_b.optimizer, torch.optim.SGD) and tr_b.resumed_from is not None
    # the SGD momentum buffers were restored: the resumed run equals the uninterrupted one, bitwise
    assert {**first.losses, **second.losses} == full.losses
    for (name, p_full), (_, p_res) in zip(m_full.state_dict().items(), m_b.state_dict().items()):
        assert torch.equal(p_full, p_res), name


def test_default_optimizer_is_adamw_and_bad_factory_is_refused(make_tiny_model, make_data):
    tr = MoETrainer(make_tiny_model(), console=False)
    tr.train(make_data(n=8), max_steps=1, batch_size=4)
    assert isinstance(tr.optimizer, torch.optim.AdamW)
    bad = MoETrainer(make_tiny_model(), console=False, optimizer_factory=lambda m, c: "sgd")
    with pytest.raises(TypeError, match=r"optimizer_factory must return a torch\.optim\.Optimizer, got str"):
        bad.train(make_data(n=8), max_steps=1, batch_size=4)


def test_collate_keeps_task_ids():
    items = [{"input_ids": torch.arange(4), "task_ids": torch.tensor(t)} for t in (2, 0, 1)]
    items[1]["task_ids"] = 0  # a plain int works too
    batch = collate(items)
    assert batch["task_ids"].dtype == torch.int64 and batch["task_ids"].tolist() == [2, 0, 1]
    assert batch["input_ids"].shape == (3, 4)
    assert "task_ids" not in collate([{"input_ids": torch.arange(4)}] * 2)
    with pytest.raises(ValueError, match="item 1 of the batch: 'task_ids' must be one integer"):
        collate([items[0], {"input_ids": torch.arange(4), "task_ids": torch.tensor([1, 2])}])
    with pytest.raises(ValueError, match=r"item 1 .* got no task_ids"):
        collate([items[0], {"input_ids": torch.arange(4)}])
    with pytest.raises(ValueError, match=r"got \(\) torch\.float32"):
        collate([items[0], {"input_ids": torch.arange(4), "task_ids": torch.tensor(1.0)}])


class TaskData(torch.utils.data.Dataset):
    """Pattern sequences, each with a task id (only tasks ``< used``)."""

    def __init__(self, seqs: torch.Tensor, used: int) -> None:
        self.seqs = seqs
        self.tasks = torch.arange(len(seqs)) % used

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.seqs[i], "task_ids": self.tasks[i]}


def test_task_ids_reach_the_model(make_tiny_model, make_data):
    model = make_tiny_model(num_tasks=3)
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        seen.append(kwargs.get("task_ids"))

    model.register_forward_pre_hook(record, with_kwargs=True)
    data = TaskData(make_data(n=16), used=2)
    before = model.task_embed.weight.detach().clone()
    sgd = SGDFactory(lr=0.5)
    tr = MoETrainer(model, console=False, optimizer_factory=sgd)
    tr.train(data, max_steps=3, batch_size=4, warmup_steps=0)
    assert len(seen) == 3 and all(t is not None and t.shape == (4,) and t.dtype == torch.int64 for t in seen)
    assert all(set(t.tolist()) <= {0, 1} for t in seen)
    after = model.task_embed.weight.detach()
    # the rows of the tasks in the data were trained; the unused task got no gradient (SGD, no decay)
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[1], before[1])
    assert torch.equal(after[2], before[2])
    # evaluation passes them too (the model refuses a forward without task_ids)
    seen.clear()
    res = tr.evaluate(data, batch_size=5)
    assert res.tokens == 16 * 15 and [len(t) for t in seen] == [5, 5, 5, 1]
    with pytest.raises(ValueError, match="task_ids is required"):
        tr.evaluate(make_data(n=4), batch_size=4)


def test_no_task_ids_for_models_without_tasks(make_tiny_model, make_data):
    model = make_tiny_model()  # num_tasks=0: a forward with task_ids would be refused
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append("task_ids" in kw), with_kwargs=True)
    MoETrainer(model, console=False).train(make_data(n=8), max_steps=2, batch_size=4)
    assert seen == [False, False]


def test_distributed_helpers_carry_task_ids_and_the_factory(tmp_path, make_tiny_model, make_data):
    from moe_lab.parallel.mesh import ParallelContext
    from moe_lab.train import distributed as mdist
    from moe_lab.train.checkpoint import latest_checkpoint

    # each rank's slice of the global batch keeps its rows' task ids
    batch = collate([{"input_ids": torch.full((4,), i), "task_ids": i % 3} for i in range(4)])
    ctx = ParallelContext(
        rank=1, world_size=2, local_rank=1, dp_size=2, ep_size=1, device=torch.device("cpu")
    )
    part = mdist.rank_slice(batch, ctx)
    assert part["task_ids"].tolist() == [2, 0] and part["input_ids"][:, 0].tolist() == [2, 3]

    # a single-process checkpoint preloaded for a multi-process resume rebuilds the factory's optimizer
    run, sgd = tmp_path / "r", SGDFactory()
    tr = MoETrainer(make_tiny_model(), run_dir=run, console=False, optimizer_factory=sgd)
    tr.train(make_data(n=8), max_steps=2, batch_size=4, checkpoint_every=2)
    model = make_tiny_model(seed=5)
    loaded, named = mdist.preload_single_file(
        latest_checkpoint(run),
        model=model,
        cfg=tr.config,
        model_config=None,
        device=torch.device("cpu"),
        optimizer_factory=sgd,
    )
    assert loaded.step == 2 and len(sgd.calls) == 2
    assert named is not None and all("momentum_buffer" in s for s in named["state"].values())
