"""Fixtures for fine-tuning tests: a tiny model imported from a transformers Mixtral checkpoint, a tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_lab.models import MoEModel

VOCAB = 96


class CharTokenizer:
    """Printable ASCII -> ids 1..95 (0 = padding); enough for instruction-data tests."""

    vocab_size = VOCAB
    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [min(max(ord(c) - 31, 1), VOCAB - 1) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i + 31) for i in ids if i > 0)


@pytest.fixture
def char_tok() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def tiny_model() -> MoEModel:
    torch.manual_seed(0)
    return MoEModel(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=32,
        num_experts=4,
        experts_per_token=2,
        num_shared_experts=1,
        shared_expert_gate=True,
        max_seq_len=128,
        impl="loop",
    )


@pytest.fixture
def imported_mixtral(tmp_path: Path) -> MoEModel:
    transformers = pytest.importorskip("transformers")
    from moe_lab.interop import load_pretrained

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "mixtral")
    return load_pretrained(tmp_path / "mixtral")
