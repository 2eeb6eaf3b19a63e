"""Instruction data: chat rendering and the response-only loss mask, checked on the label tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_lab.finetune.instruct import (
    IGNORE_INDEX,
    ChatTemplate,
    InstructDataset,
    collate_instruct,
    encode_example,
    load_instruct_jsonl,
)


def _labelled_text(ex, tok) -> str:
    # the char tokenizer turns newlines into spaces; strip them for readable comparisons
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]).replace(" ", "")


def test_prompt_tokens_are_masked(char_tok) -> None:
    ex = encode_example({"prompt": "What is 2+2?", "response": "4"}, char_tok, ChatTemplate(eos_token="#"))
    text = char_tok.decode(ex.input_ids)
    assert text.startswith("<|user|>") and "What is 2+2?" in text
    assert len(ex.labels) == len(ex.input_ids)
    first = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX)
    assert all(lab == IGNORE_INDEX for lab in ex.labels[:first])  # the whole prompt, incl. the header
    assert char_tok.decode(ex.input_ids[:first]).rstrip().endswith("<|assistant|>")
    assert _labelled_text(ex, char_tok) == "4#"
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ex.input_ids, ex.labels))


def test_multi_turn_only_assistant_turns(char_tok) -> None:
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "AAA"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "BBB"},
    ]
    ex = encode_example({"messages": msgs}, char_tok, ChatTemplate(eos_token="#"))
    assert _labelled_text(ex, char_tok) == "AAA#BBB#"
    masked = char_tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE_INDEX])
    assert "be brief" in masked and "again" in masked and "AAA" not in masked


def test_checkpoint_chat_template(tmp_path: Path, char_tok) -> None:
    chatml = (
        "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": chatml, "bos_token": {"content": "<s>"}, "eos_token": "</s>"})
    )
    tpl = ChatTemplate.from_checkpoint(tmp_path)
    ex = encode_example({"prompt": "Q", "response": "A"}, char_tok, tpl)
    assert char_tok.decode(ex.input_ids).startswith("<s><|im_start|>user")
    assert _labelled_text(ex, char_tok) == "A<|im_end|>"
    assert ChatTemplate.from_checkpoint(tmp_path / "missing").source == ChatTemplate().source


def test_template_is_sandboxed() -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        ChatTemplate(evil).render([{"role": "user", "content": "x"}])


def test_jsonl_loading_and_errors(tmp_path: Path, char_tok) -> None:
    good = tmp_path / "data.jsonl"
    good.write_text(
        json.dumps({"prompt": "a", "response": "b", "task": "math"})
        + "\n\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}], "task": 1}
        )
        + "\n"
    )
    exs = load_instruct_jsonl(good, char_tok, task_names={"math": 0, "code": 1}, max_length=12)
    assert [e.task_id for e in exs] == [0, 1] and all(len(e.input_ids) <= 12 for e in exs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        load_instruct_jsonl(bad, char_tok)
    bad.write_text('{"question": "a"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected 'prompt' and 'response'"):
        load_instruct_jsonl(bad, char_tok)
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(ValueError, match="no assistant turn"):
        load_instruct_jsonl(bad, char_tok)
    with pytest.raises(FileNotFoundError):
        load_instruct_jsonl(tmp_path / "nope.jsonl", char_tok)


def test_collate_pads_and_masks(char_tok) -> None:
    a = encode_example({"prompt": "p", "response": "long response"}, char_tok)
    b = encode_example({"prompt": "p", "response": "r"}, char_tok)
    batch = collate_instruct([a, b], pad_id=0)
    n_b = len(b.input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(a.input_ids))
    assert torch.all(batch["labels"][1, n_b:] == IGNORE_INDEX) and torch.all(
        batch["attention_mask"][1, n_b:] == 0
    )
    assert torch.equal(batch["labels"][1, :n_b], torch.tensor(b.labels))
    ds = InstructDataset([a, b])
    assert ds[1]["input_ids"].shape == (len(a.input_ids),) and "task_ids" not in ds[1]


def test_hf_tokenizers_tokenizer() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ex = encode_example(
        {"prompt": "hello", "response": "world"},
        tok,
        ChatTemplate(
            "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}{% endif %}"
        ),
    )
    assert ex.input_ids == [0, 1] and ex.labels == [IGNORE_INDEX, 1]
