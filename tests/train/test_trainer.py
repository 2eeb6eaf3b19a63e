"""MoETrainer: loss falls, data kinds, grad accumulation, bf16, aux-free balancing, eval, metrics."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from moe_lab.train import Callback, MoETrainer, TrainConfig
from moe_lab.train.rundir import read_metrics


def test_loss_falls_and_result_fields(make_tiny_model, make_data):
    data = make_data(n=64, seq=16)
    res = MoETrainer(make_tiny_model(), console=False).train(
        data, eval_data=data[:16], max_steps=40, batch_size=8, learning_rate=1e-2, warmup_steps=5
    )
    assert res.steps == 40 and res.tokens == 40 * 8 * 16
    assert res.final_lm_loss < math.log(64) - 1.0  # well below the uniform-guess loss
    assert res.eval_loss is not None and res.perplexity == pytest.approx(math.exp(res.eval_loss))
    assert res.tokens_per_s > 0 and res.run_dir is None


def test_accepts_tensor_and_token_lists(make_tiny_model):
    lists = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13]] * 4  # unequal lengths: padded + masked
    res = MoETrainer(make_tiny_model(), console=False).train(lists, max_steps=2, batch_size=4)
    assert res.steps == 2 and 2 * 4 * 3 <= res.tokens < 2 * 4 * 6
    equal = [[1, 2, 3, 4]] * 8
    assert MoETrainer(make_tiny_model(), console=False).train(equal, max_steps=1, batch_size=4).tokens == 16
    with pytest.raises(ValueError, match="train_data is empty"):
        MoETrainer(make_tiny_model(), console=False).train([], max_steps=1)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        MoETrainer(make_tiny_model(), console=False).train(torch.zeros(2, 8, dtype=torch.long), batch_size=4)


def test_padded_lists_count_only_real_tokens(make_tiny_model):
    lists = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    res = MoETrainer(make_tiny_model(), console=False).train(lists, max_steps=1, batch_size=2)
    assert res.tokens == 9


def test_seq_len_longer_than_model_is_refused(make_tiny_model):
    with pytest.raises(ValueError, match=re.escape("model.max_seq_len is 64")):
        MoETrainer(make_tiny_model(), console=False).train(torch.zeros(8, 65, dtype=torch.long), max_steps=1)


def test_num_epochs_and_max_steps_whichever_first(make_tiny_model, make_data):
    data = make_data(n=40)  # 5 batches of 8 per epoch
    assert MoETrainer(make_tiny_model(), console=False, batch_size=8).train(data).steps == 5  # one epoch
    assert MoETrainer(make_tiny_model(), console=False, max_steps=7, batch_size=8).train(data).steps == 7
    assert MoETrainer(make_tiny_model(), console=False, num_epochs=2, batch_size=8).train(data).steps == 10
    tr = MoETrainer(make_tiny_model(), console=False, num_epochs=2, max_steps=3, batch_size=8)
    assert tr.train(data).steps == 3


def test_grad_accumulation_equals_big_batch(make_tiny_model, make_data):
    data = make_data(n=32, seq=16)
    # aux loss is per micro-batch (not linear in the batch): switch it off for this equality
    common = {"max_steps": 2, "aux_loss_coef": 0.0, "grad_clip": None, "seed": 1}
    big = make_tiny_model(seed=0)
    MoETrainer(big, console=False, batch_size=8, grad_accum_steps=1, **common).train(data)
    small = make_tiny_model(seed=0)
    MoETrainer(small, console=False, batch_size=4, grad_accum_steps=2, **common).train(data)
    for (name, a), (_, b) in zip(big.named_parameters(), small.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_autocast_keeps_fp32_master_weights(make_tiny_model, make_data):
    model = make_tiny_model()
    res = MoETrainer(model, console=False, precision="bf16").train(
        make_data(), eval_data=make_data(n=8), max_steps=3, batch_size=4
    )
    assert math.isfinite(res.final_loss) and math.isfinite(res.eval_loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_router_learning_rate_group(make_tiny_model, make_data):
    model = make_tiny_model()
    tr = MoETrainer(
        model,
        console=False,
        learning_rate=1e-3,
        router_learning_rate=5e-2,
        warmup_steps=0,
        lr_schedule="constant",
    )
    tr.train(make_data(), max_steps=1, batch_size=4)
    groups = {g["name"]: g for g in tr.optimizer.param_groups}
    assert groups["router"]["lr"] == pytest.approx(5e-2) and groups["decay"]["lr"] == pytest.approx(1e-3)
    router_ids = {id(layer.router.gate.weight) for layer in model.moe_layers()}
    assert router_ids == {id(p) for p in groups["router"]["params"]}
    assert groups["router"]["weight_decay"] == 0.0 and groups["no_decay"]["weight_decay"] == 0.0
    assert id(model.embed_tokens.weight) in {id(p) for p in groups["no_decay"]["params"]}


def test_aux_free_bias_updates_router_biases(make_tiny_model, make_data):
    model = make_tiny_model(router_type="sigmoid_bias")
    before = [layer.router.expert_bias.clone() for layer in model.moe_layers()]
    seen = []

    class Grab(Callback):
        def on_step_end(self, trainer, step, metrics):
            seen.append(metrics["aux_loss"])

    MoETrainer(model, console=False, load_balancing="aux_free_bias", callbacks=[Grab()]).train(
        make_data(), max_steps=3, batch_size=4
    )
    after = [layer.router.expert_bias for layer in model.moe_layers()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert seen == [0.0, 0.0, 0.0] and model.config.aux_loss_coef == 0.0


def test_load_balancing_none_zeroes_aux(make_tiny_model, make_data):
    model = make_tiny_model()
    res = MoETrainer(model, console=False, load_balancing="none").train(
        make_data(), max_steps=1, batch_size=4
    )
    assert res.final_loss == pytest.approx(res.final_lm_loss + 0.0, abs=0.05)
    assert model.config.aux_loss_coef == 0.0


def test_evaluate_matches_reference(make_tiny_model, make_data):
    model = make_tiny_model()
    data = make_data(n=10, seq=16)
    res = MoETrainer(model, console=False, batch_size=4).evaluate(data)
    model.eval()
    with torch.no_grad():
        logits = model(data).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
    assert res.tokens == 10 * 15
    assert res.loss == pytest.approx(float(ref), rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(float(ref)), rel=1e-5)


def test_metrics_jsonl_and_summary(tmp_path, make_tiny_model, make_data):
    run = tmp_path / "run"
    MoETrainer(make_tiny_model(), run_dir=run, console=False, eval_every=2).train(
        make_data(), eval_data=make_data(n=8), max_steps=4, batch_size=4
    )
    lines = read_metrics(run / "metrics.jsonl")
    steps = [m for m in lines if "loss" in m]
    evals = [m for m in lines if m.get("split") == "val"]
    assert [m["step"] for m in steps] == [1, 2, 3, 4] and [m["step"] for m in evals] == [2, 4]
    for key in ("lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "drop_rate"):
        assert key in steps[0]
    for layer in steps[0]["expert_load"]:
        assert len(layer) == 4 and sum(layer) == pytest.approx(1.0, abs=1e-4)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval_loss"] == evals[-1]["eval_loss"]
    assert (run / "config.yaml").is_file()


def test_on_routing_gets_merged_detached_decisions(make_tiny_model, make_data):
    got = []

    class Grab(Callback):
        def on_routing(self, trainer, step, routing):
            got.append(routing)

    MoETrainer(make_tiny_model(), console=False, callbacks=[Grab()], grad_accum_steps=2).train(
        make_data(), max_steps=1, batch_size=4
    )
    (routing,) = got
    assert len(routing) == 2  # two MoE layers
    assert routing[0].router_logits.shape == (2 * 4 * 16, 4)  # both micro-batches
    assert not routing[0].router_logits.requires_grad
    assert int(routing[0].tokens_per_expert.sum()) == 2 * 4 * 16 * 2  # top-2


def test_early_stopping(make_tiny_model, make_data):
    # a tiny lr cannot lower the val loss by min_delta: the 1st eval sets the best, then 2 misses -> stop
    data = make_data()
    tr = MoETrainer(
        make_tiny_model(),
        console=False,
        early_stopping_patience=2,
        early_stopping_min_delta=0.5,
        eval_every=1,
        eval_batches=1,
    )
    res = tr.train(
        data,
        eval_data=data[:4],
        max_steps=50,
        batch_size=4,
        learning_rate=1e-7,
        warmup_steps=0,
        lr_schedule="constant",
    )
    assert res.stopped_early and res.steps == 3
    assert tr.state.evals_without_improvement == 2


def test_unknown_kwarg_is_an_error(make_tiny_model):
    with pytest.raises(ValueError, match="unknown training option"):
        MoETrainer(make_tiny_model(), console=False, max_stepz=3)


def test_train_config_validation():
    from moe_lab.config import ConfigError

    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


def test_callbacks_by_name_from_config(tmp_path, make_tiny_model, make_data):
    # `train.callbacks` resolves registry names lazily (router_monitor lives in the analytics package)
    run = tmp_path / "run"
    tr = MoETrainer(make_tiny_model(), run_dir=run, console=False, callbacks=[], max_steps=2, batch_size=4)
    tr.config = tr.config.with_overrides(
        {"callbacks": ["router_monitor", {"name": "early_stopping", "patience": 9}]}
    )
    tr.train(make_data())
    names = [type(cb).__name__ for cb in tr.callbacks]
    assert "RouterMonitorCallback" in names and "EarlyStopping" in names
    assert (run / "routing.jsonl").is_file()


def test_divergence_is_a_clear_error(make_tiny_model, make_data):
    model = make_tiny_model()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="training diverged: the loss is nan at step 1"):
        MoETrainer(model, console=False).train(make_data(), max_steps=2, batch_size=4)


def test_save_model_round_trip(tmp_path, make_tiny_model, make_data):
    from moe_lab.data import ByteTokenizer, load_tokenizer
    from moe_lab.models import MoEModel

    model = make_tiny_model()
    tr = MoETrainer(model, console=False, tokenizer=ByteTokenizer())
    tr.train(make_data(), max_steps=1, batch_size=4)
    path = tr.save_model(tmp_path / "export")
    loaded = MoEModel.load(str(path)).eval()
    model.eval()
    x = make_data(n=2)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert load_tokenizer(str(path)).vocab_size == 259


def test_train_gives_pooled_temporaries_back(monkeypatch):
    """Large CPU temporaries come from moe_lab.nn.huge_pages' pool during training; train() unmaps the free
    ones at the end, so a long-lived process does not keep a step's worth of buffers."""
    from moe_lab.models import MoEModel
    from moe_lab.nn import huge_pages

    pool = huge_pages._BufferPool(1 << 30)
    monkeypatch.setattr(huge_pages, "_pool", pool)
    monkeypatch.setattr(huge_pages, "_available", True)
    taken = []
    real_take = pool.take
    monkeypatch.setattr(pool, "take", lambda numel, dtype: taken.append(numel) or real_take(numel, dtype))
    torch.manual_seed(0)
    model = MoEModel.from_preset("tiny", vocab_size=8192)  # logits of 8 x 16 x 8192 float32: 4 MiB
    data = torch.randint(0, 8192, (16, 16))
    MoETrainer(model, console=False).train(data, max_steps=2, batch_size=8)
    assert taken  # the fused loss's buffers were pooled
    assert pool.stats()["free_bytes"] == 0
