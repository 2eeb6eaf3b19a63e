"""Instruction data from JSONL with loss masks: the loss covers response tokens only.

Each line is one JSON object, either

* ``{"prompt": "...", "response": "..."}`` (a single turn), or
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` (a chat),

optionally with ``"task": <int or name>`` for task-adaptive routing. Text is rendered with the checkpoint's
chat template (``tokenizer_config.json`` ``chat_template``, Jinja2 in a sandbox) or :data:`DEFAULT_CHAT_TEMPLATE`.
Labels follow the Hugging Face convention (the model shifts them): the token id on assistant tokens,
``-100`` on prompt/system/user tokens and on padding.

Example:
    >>> from moe_lab.finetune.instruct import encode_example, ChatTemplate
    >>> class Chars:                                   # any tokenizer with encode(text) -> list[int]
    ...     def encode(self, text): return [ord(c) for c in text]
    >>> ex = encode_example({"prompt": "hi", "response": "yo"}, Chars(), ChatTemplate(eos_token="$"))
    >>> "".join(chr(t) for t, l in zip(ex.input_ids, ex.labels) if l != -100)
    'yo$\\n'
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "ChatTemplate",
    "InstructDataset",
    "InstructExample",
    "collate_instruct",
    "encode_example",
    "load_instruct_jsonl",
]

IGNORE_INDEX = -100

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _token_str(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


class ChatTemplate:
    """A Jinja2 chat template rendered in a sandbox (no file or attribute access beyond the messages).

    ``ChatTemplate.from_checkpoint(dir)`` reads ``tokenizer_config.json`` (``chat_template``, ``bos_token``,
    ``eos_token``) and falls back to :data:`DEFAULT_CHAT_TEMPLATE`.
    """

    def __init__(self, template: str | None = None, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.source = template or DEFAULT_CHAT_TEMPLATE
        try:
            self._template = env.from_string(self.source)
        except TemplateError as err:
            raise ValueError(f"chat_template: not a valid Jinja2 template ({err})") from err
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | os.PathLike[str] | None) -> ChatTemplate:
        """The template of a Hugging Face checkpoint folder (default template when it has none)."""
        if ckpt_dir is None:
            return cls()
        path = Path(ckpt_dir) / "tokenizer_config.json"
        if not path.is_file():
            return cls()
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from err
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja = Path(ckpt_dir) / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        return cls(template, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")))

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The prompt text of ``messages`` (with the assistant header appended if asked)."""
        return str(
            self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        )


@dataclass
class InstructExample:
    """One tokenised example: ``labels[i]`` is ``input_ids[i]`` on response tokens and -100 elsewhere."""

    input_ids: list[int]
    labels: list[int]
    task_id: int | None = None


def _encode(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    try:
        from tokenizers import Tokenizer

        if isinstance(tokenizer, Tokenizer):
            return list(tokenizer.encode(text, add_special_tokens=False).ids)
    except ImportError:  # pragma: no cover - tokenizers is a core dependency
        pass
    out = tokenizer.encode(text)
    return list(out.ids) if hasattr(out, "ids") else [int(t) for t in out]


def _messages_of(record: dict[str, Any], where: str) -> list[dict[str, Any]]:
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                raise ValueError(f"{where}: messages[{j}] needs a 'role' and a string 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: 'messages' has no assistant turn to learn from")
        return msgs
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    raise ValueError(f"{where}: expected 'prompt' and 'response' strings or a 'messages' list")


def encode_example(
    record: dict[str, Any],
    tokenizer: Any,
    template: ChatTemplate | None = None,
    *,
    max_length: int | None = None,
    task_names: dict[str, int] | None = None,
    where: str = "example",
) -> InstructExample:
    """Render and tokenise one record; only assistant turns get labels.

    The text is cut at each assistant turn's boundaries (rendered prefix with the generation prompt vs.
    prefix plus the turn) and the pieces are tokenised separately, so the mask is exact for any tokenizer.
    """
    template = template or ChatTemplate()
    msgs = _messages_of(record, where)
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = template.render(msgs[:i], add_generation_prompt=True)
        upto = template.render(msgs[: i + 1])
        if not prefix.startswith(done) or not upto.startswith(prefix):
            raise ValueError(f"{where}: the chat template does not render turns as prefixes of each other")
        prompt_ids = _encode(tokenizer, prefix[len(done) :])
        reply_ids = _encode(tokenizer, upto[len(prefix) :])
        ids += prompt_ids + reply_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + reply_ids
        done = upto
    tail = template.render(msgs)
    if tail.startswith(done) and len(tail) > len(done):
        rest = _encode(tokenizer, tail[len(done) :])
        ids += rest
        labels += [IGNORE_INDEX] * len(rest)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    task = record.get("task")
    task_id: int | None = None
    if task is not None:
        if isinstance(task, bool) or not isinstance(task, (int, str)):
            raise ValueError(f"{where}: 'task' must be an integer id or a name, got {task!r}")
        if isinstance(task, str):
            if task_names is None:
                raise ValueError(f"{where}: task name {task!r} given but no task_names mapping")
            if task not in task_names:
                raise ValueError(f"{where}: unknown task {task!r}; known: {sorted(task_names)}")
            task_id = task_names[task]
        else:
            task_id = int(task)
    return InstructExample(ids, labels, task_id)


def load_instruct_jsonl(
    path: str | os.PathLike[str],
    tokenizer: Any,
    template: ChatTemplate | None = None,
    *,
    max_length: int | None = None,
    task_names: dict[str, int] | None = None,
) -> list[InstructExample]:
    """Read and tokenise every line of a JSONL file (errors name the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data {path}: not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object")
        out.append(
            encode_example(
                record, tokenizer, template, max_length=max_length, task_names=task_names, where=where
            )
        )
    if not out:
        raise ValueError(f"instruction data {path}: no examples")
    return out


class InstructDataset(torch.utils.data.Dataset):
    """Map-style dataset of fixed-length items for the trainer.

    Each item is a dict of ``[L]`` tensors right-padded to ``length`` (default: the longest example):
    ``input_ids``, ``attention_mask`` (0 on padding), ``labels`` (-100 on prompt and padding), and a 0-dim
    ``task_ids`` when the examples carry task ids (the trainer's batches stack it to ``[B]`` and pass it to
    the model's forward).
    """

    def __init__(
        self, examples: Sequence[InstructExample], pad_id: int = 0, length: int | None = None
    ) -> None:
        self.examples = list(examples)
        if not self.examples:
            raise ValueError("InstructDataset: no examples")
        with_task = {e.task_id is not None for e in self.examples}
        if len(with_task) > 1:
            raise ValueError("task ids: either every example has a 'task' or none has")
        self.pad_id = pad_id
        self.length = length or max(len(e.input_ids) for e in self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = collate_instruct([self.examples[i]], self.pad_id, pad_to=self.length)
        item = {k: v[0, : self.length] for k, v in batch.items() if k != "task_ids"}
        if "task_ids" in batch:
            item["task_ids"] = batch["task_ids"][0]
        return item


def collate_instruct(
    examples: Sequence[InstructExample], pad_id: int = 0, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (or ``pad_to``): ``input_ids``, ``attention_mask``, ``labels``
    (-100 on padding) and ``task_ids`` when every example has one."""
    length = max(len(e.input_ids) for e in examples)
    if pad_to is not None:
        length = max(length, pad_to)
    b = len(examples)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    tasks = [e.task_id for e in examples]
    if all(t is not None for t in tasks):
        batch["task_ids"] = torch.tensor(tasks, dtype=torch.long)
    elif any(t is not None for t in tasks):
        raise ValueError("task ids: either every example in a batch has a 'task' or none has")
    return batch
