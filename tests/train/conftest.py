"""Fixtures for the training tests: a tiny model factory and small token data."""

from __future__ import annotations

import pytest
import torch

from moe_lab.models import MoEModel, get_preset

VOCAB = 64


def make_model(seed: int = 0, **overrides) -> MoEModel:
    torch.manual_seed(seed)
    fields = {"vocab_size": VOCAB, "max_seq_len": 64, **overrides}
    return MoEModel(get_preset("tiny", **fields))


def pattern_data(n: int = 40, seq: int = 16, seed: int = 0) -> torch.Tensor:
    """Learnable sequences: arithmetic progressions mod VOCAB with random start and stride."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(seq)) % VOCAB


@pytest.fixture
def make_tiny_model():
    """``make_tiny_model(seed=0, **model_fields) -> MoEModel`` (tiny preset, vocab 64)."""
    return make_model


@pytest.fixture
def make_data():
    """``make_data(n=40, seq=16, seed=0) -> LongTensor[n, seq]`` of learnable patterns."""
    return pattern_data


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes run fastest (and steadiest on a shared machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
