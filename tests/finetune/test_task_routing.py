"""Task-adaptive routing: enabling it is a no-op until trained; multi-task fine-tuning; task-conditioned generation."""

from __future__ import annotations

import pytest
import torch

from moe_lab.finetune import FineTuneConfig, FineTuner, enable_task_routing, encode_example, generate_for_task
from moe_lab.finetune.task_routing import task_expert_load, task_id_of


def test_enable_is_a_no_op_until_trained(tiny_model) -> None:
    tiny_model.eval()
    ids = torch.randint(0, 96, (2, 8))
    before = tiny_model(ids).logits
    enable_task_routing(tiny_model, ["upper", "lower"])
    assert tiny_model.config.num_tasks == 2 and task_id_of(tiny_model, "lower") == 1
    for t in (0, 1):
        assert torch.equal(tiny_model(ids, task_ids=torch.tensor([t, t])).logits, before)
    with pytest.raises(ValueError, match="task_ids is required"):
        tiny_model(ids)
    with pytest.raises(ValueError, match="already has task routing"):
        enable_task_routing(tiny_model, 3)
    with pytest.raises(ValueError, match="unknown task 'other'"):
        task_id_of(tiny_model, "other")


@pytest.mark.slow
def test_multi_task_finetuning_and_generation(tiny_model, char_tok) -> None:
    enable_task_routing(tiny_model, ["copy", "shout"])
    names = {"copy": 0, "shout": 1}
    data = []
    for w in ["abc", "dog", "sun", "map", "red", "top", "cup", "hat"]:
        data.append(encode_example({"prompt": w, "response": w, "task": "copy"}, char_tok, task_names=names))
        data.append(
            encode_example({"prompt": w, "response": w.upper(), "task": "shout"}, char_tok, task_names=names)
        )
    before = tiny_model.task_embed.weight.clone()
    ft = FineTuner(tiny_model, FineTuneConfig(learning_rate=1e-2, freeze=["embeddings"]), console=False)
    per_task = {t: [e for e in data if e.task_id == t] for t in (0, 1)}
    first = ft.evaluate(data, batch_size=16).loss
    first_per_task = {t: ft.evaluate(exs, batch_size=8).loss for t, exs in per_task.items()}
    ft.train(data, max_steps=30, batch_size=16, warmup_steps=0, weight_decay=0.0)
    assert ft.evaluate(data, batch_size=16).loss < first - 0.5
    for t, exs in per_task.items():  # each task's batches carry their own task_ids and both improve
        assert ft.evaluate(exs, batch_size=8).loss < first_per_task[t] - 0.5, t
    assert not torch.equal(tiny_model.task_embed.weight, before)  # the task vectors were trained
    ids = torch.tensor([char_tok.encode("<|user|>\ncat\n<|assistant|>\n")])
    load = task_expert_load(tiny_model, ids)
    assert load.shape == (2, 2, 4) and torch.allclose(load.sum(-1), torch.ones(2, 2))
    assert not torch.equal(load[0], load[1])  # routing depends on the task
    outs = {
        t: generate_for_task(tiny_model, ids, t, max_new_tokens=3, temperature=0.0) for t in ("copy", "shout")
    }
    assert all(len(o.new_tokens[0]) == 3 for o in outs.values())
    with torch.no_grad():
        l0 = tiny_model(ids, task_ids=torch.tensor([0])).logits
        l1 = tiny_model(ids, task_ids=torch.tensor([1])).logits
    assert not torch.allclose(l0, l1)
