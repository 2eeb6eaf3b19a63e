"""MoEModel keeps its large CPU weights in huge-page storage through construction, ``.to`` and loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_lab.models import MoEModel
from moe_lab.nn.huge_pages import HUGE_PAGE_BYTES, huge_pages_available

needs_thp = pytest.mark.skipif(not huge_pages_available(), reason="transparent huge pages not available")

# expert weights [4, 256, 512] float32 = 2 MiB each; embedding 4096 x 256 = 4 MiB (tied)
FIELDS = dict(vocab_size=4096, hidden_size=256, num_layers=1, num_heads=4, ffn_hidden_size=512,
              num_experts=4, experts_per_token=2, tie_embeddings=True)  # fmt: skip


def _large(model: MoEModel) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.numel() * p.element_size() >= HUGE_PAGE_BYTES]


def _aligned(model: MoEModel) -> bool:
    return all(p.data_ptr() % HUGE_PAGE_BYTES == 0 for p in _large(model))


@needs_thp
def test_construction_to_and_load_keep_huge_pages(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MoEModel(**FIELDS).eval()
    assert len(_large(model)) == 4 and _aligned(model)  # w1, w3, w2, embedding (= lm_head)
    assert model.lm_head.weight is model.embed_tokens.weight
    ids = torch.randint(0, 4096, (2, 5))
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(str(tmp_path / "m"))
    loaded = MoEModel.load(str(tmp_path / "m"))
    assert _aligned(loaded)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, ref)
    doubled = model.to(torch.float64)
    assert doubled.embed_tokens.weight.dtype == torch.float64 and _aligned(doubled)
    assert doubled.lm_head.weight is doubled.embed_tokens.weight


@needs_thp
def test_interop_import_gets_huge_pages(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from moe_lab.interop import load_pretrained, save_pretrained_hf

    torch.manual_seed(0)
    model = MoEModel(**{**FIELDS, "tie_embeddings": False}).eval()
    save_pretrained_hf(model, tmp_path / "hf", family="mixtral")
    imported = load_pretrained(tmp_path / "hf")
    assert len(_large(imported)) == 5 and _aligned(imported)
    for (name, a), (_, b) in zip(model.state_dict().items(), imported.state_dict().items()):
        assert torch.equal(a, b), name


def test_weights_same_values_with_or_without_huge_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_lab.nn import huge_pages

    torch.manual_seed(0)
    a = MoEModel(**FIELDS)
    monkeypatch.setattr(huge_pages, "_available", False)
    torch.manual_seed(0)
    b = MoEModel(**FIELDS)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
