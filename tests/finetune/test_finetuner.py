"""FineTuner: freezing, learning-rate groups, LoRA through the trainer, checkpoints, and the loss going down."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from moe_lab.finetune import FineTuneConfig, FineTuner, LoRAConfig, encode_example, freeze_parameters
from moe_lab.finetune.finetuner import matches_group
from moe_lab.train import latest_checkpoint

PAIRS = [
    ("add 1 2", "3"),
    ("add 2 2", "4"),
    ("add 3 4", "7"),
    ("add 1 5", "6"),
    ("add 2 6", "8"),
    ("add 4 5", "9"),
    ("add 0 2", "2"),
    ("add 3 3", "6"),
]


def _examples(tok, task=None):
    return [
        encode_example({"prompt": p, "response": r, **({"task": task} if task is not None else {})}, tok)
        for p, r in PAIRS
    ]


def test_frozen_parameters_stay_bit_identical(tiny_model, char_tok) -> None:
    before = copy.deepcopy(tiny_model.state_dict())
    ft = FineTuner(
        tiny_model,
        FineTuneConfig(learning_rate=1e-2, freeze=["experts", "attention", "embeddings"]),
        console=False,
    )
    ft.train(_examples(char_tok), max_steps=3, batch_size=4)
    after = tiny_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for name in ft.frozen:
        assert torch.equal(before[name], after[name]), name
    assert any(".experts." in n for n in ft.frozen) and any("self_attn" in n for n in ft.frozen)
    assert "embed_tokens.weight" in ft.frozen
    assert any("router" in k for k in changed) and any("shared_experts" in k for k in changed)
    assert not changed & set(ft.frozen)


def test_learning_rate_groups(tiny_model, char_tok) -> None:
    cfg = FineTuneConfig(learning_rate=1e-4, router_learning_rate=1e-3, expert_learning_rate=5e-4)
    ft = FineTuner(tiny_model, cfg, console=False, lr_schedule="constant")
    ft.train(_examples(char_tok), max_steps=1, batch_size=4)
    groups = {g["name"]: g for g in ft.trainer.optimizer.param_groups}
    assert {n: g["lr"] for n, g in groups.items()} == {
        "decay": 1e-4,
        "no_decay": 1e-4,
        "router": 1e-3,
        "experts": 5e-4,
    }
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    assert all(".mlp.experts." in names[id(p)] for p in groups["experts"]["params"])
    assert all(".router." in names[id(p)] for p in groups["router"]["params"])
    assert groups["router"]["weight_decay"] == 0.0


def test_freeze_patterns(tiny_model) -> None:
    assert matches_group("layers.0.mlp.experts.w1_EDF", "experts")
    assert not matches_group("layers.0.mlp.shared_experts.w1.weight", "experts")
    assert matches_group("layers.1.post_attention_layernorm.weight", "norms")
    frozen = freeze_parameters(tiny_model, ["layers.1.*"])
    assert frozen and all(n.startswith("layers.1.") for n in frozen)
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze_parameters(tiny_model, ["layers.9.*"])
    with pytest.raises(ValueError, match="unknown group 'expert'"):
        FineTuneConfig(freeze=["expert"])


def test_lora_finetune_checkpoint_and_resume(tiny_model, char_tok, tmp_path: Path) -> None:
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    cfg = FineTuneConfig(learning_rate=5e-3, lora=LoRAConfig(rank=4, target_modules=["attention", "experts"]))
    run = tmp_path / "run"
    ft = FineTuner(tiny_model, cfg, run_dir=run, console=False, max_steps=4, batch_size=4, checkpoint_every=2)
    res = ft.train(_examples(char_tok))
    assert res.steps == 4 and latest_checkpoint(run).name == "step-4"
    for k, v in ft.lora.model.state_dict().items():
        key = k.replace(".base_layer", "")
        if ".lora_" not in k:
            assert torch.equal(v, base[key]), k  # the base weights never move
    assert all(float(v.abs().sum()) > 0 for k, v in ft.lora.adapter_state_dict().items() if "lora_B" in k)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4] and "expert_load" in lines[0]
    ft.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    # the run directory rebuilds the fine-tuned model (adapters merged) and exports to transformers
    from moe_lab.interop.rundir import export_run_dir, load_run_model

    ids = torch.randint(1, 96, (1, 12))
    tiny_model.eval()
    with torch.no_grad():
        want = tiny_model(ids).logits
        torch.testing.assert_close(load_run_model(run).eval()(ids).logits, want, rtol=1e-5, atol=1e-5)
    transformers = pytest.importorskip("transformers")
    export_run_dir(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.model_type == "qwen2_moe"
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, want, rtol=1e-4, atol=1e-5)

    # resume from step 2 in a fresh process-like setting gives the same final adapter
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-4")
    torch.manual_seed(0)
    from moe_lab.models import MoEModel

    model2 = MoEModel(tiny_model.config)
    model2.load_state_dict(base)
    ft2 = FineTuner(model2, cfg, run_dir=run, console=False, max_steps=4, batch_size=4, checkpoint_every=2)
    ft2.train(_examples(char_tok), resume_from=run)
    for k, v in ft.lora.adapter_state_dict().items():
        torch.testing.assert_close(ft2.lora.adapter_state_dict()[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_finetuning_imported_model_lowers_loss(imported_mixtral, char_tok) -> None:
    data = _examples(char_tok)
    ft = FineTuner(imported_mixtral, FineTuneConfig(learning_rate=3e-3), console=False, weight_decay=0.0)
    before = ft.evaluate(data, batch_size=8).loss
    ft.train(data, max_steps=25, batch_size=8, warmup_steps=2)
    after = ft.evaluate(data, batch_size=8).loss
    assert after < before - 1.0, (before, after)
    # only response tokens count: 2 per example ("3" + eos-less newline)
    n_resp = sum(sum(lab != -100 for lab in e.labels) for e in data)
    assert ft.evaluate(data, batch_size=8).tokens == n_resp


def test_finetuner_gives_its_optimizer_to_the_trainer(tiny_model, char_tok, tmp_path: Path) -> None:
    from moe_lab.finetune import enable_task_routing
    from moe_lab.train import Callback, optim, trainer

    class Check(Callback):
        def __init__(self) -> None:
            self.groups: list[list[str]] = []
            self.tasks: list[list[int]] = []

        def on_train_begin(self, tr) -> None:
            assert trainer.build_optimizer is optim.build_optimizer  # no monkeypatching
            self.groups.append([g["name"] for g in tr.optimizer.param_groups])

    enable_task_routing(tiny_model, 2)
    tasks: list[list[int]] = []
    tiny_model.register_forward_pre_hook(
        lambda m, a, kw: tasks.append(kw["task_ids"].tolist()), with_kwargs=True
    )
    cfg = FineTuneConfig(learning_rate=1e-3, expert_learning_rate=5e-4)
    run, check = tmp_path / "run", Check()
    kw = {"max_steps": 2, "batch_size": 4, "checkpoint_every": 2, "console": False, "callbacks": [check]}
    data = _examples(char_tok, task=1)
    FineTuner(tiny_model, cfg, run_dir=run, **kw).train(data)
    assert tasks == [[1] * 4, [1] * 4]  # the examples' task ids reach the model's forward
    ft2 = FineTuner(tiny_model, cfg, run_dir=run, **{**kw, "max_steps": 3})
    assert ft2.trainer.optimizer_factory == ft2._factory
    ft2.train(data, resume_from=run)  # the resumed optimizer has the fine-tuning groups: its state loads
    assert check.groups == [["decay", "no_decay", "router", "experts"]] * 2
    assert ft2.trainer.resumed_from is not None and ft2.trainer.state.step == 3
