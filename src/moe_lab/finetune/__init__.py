"""Fine-tuning: :class:`FineTuner` (LR groups, freezing, trainer integration), expert-wise LoRA,
instruction data with response-only loss, and task-adaptive routing.

Example:
    >>> from moe_lab.finetune import FineTuneConfig, LoRAConfig
    >>> cfg = FineTuneConfig(learning_rate=2e-4, lora=LoRAConfig(rank=8, target_modules=["attention", "experts"]))
    >>> cfg.lora.expert_wise_adaptation
    True
"""

from __future__ import annotations

from moe_lab.finetune.finetuner import FREEZE_GROUPS, FineTuneConfig, FineTuner, freeze_parameters
from moe_lab.finetune.instruct import (
    ChatTemplate,
    InstructDataset,
    InstructExample,
    collate_instruct,
    encode_example,
    load_instruct_jsonl,
)
from moe_lab.finetune.lora import LoRAConfig, MoELoRA, apply_lora, load_adapter
from moe_lab.finetune.task_routing import enable_task_routing, generate_for_task, task_expert_load

__all__ = [
    "FREEZE_GROUPS",
    "ChatTemplate",
    "FineTuneConfig",
    "FineTuner",
    "InstructDataset",
    "InstructExample",
    "LoRAConfig",
    "MoELoRA",
    "apply_lora",
    "collate_instruct",
    "enable_task_routing",
    "encode_example",
    "freeze_parameters",
    "generate_for_task",
    "load_adapter",
    "load_instruct_jsonl",
    "task_expert_load",
]
