"""RouterAnalyzer: per-token routing, specialisation (NMI), top tokens, affinity, checkpoint comparison."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moe_lab.analytics import RouterAnalyzer, compare_checkpoints, normalized_mutual_information
from moe_lab.data import ByteTokenizer
from moe_lab.models import MoEModel
from moe_lab.nn.moe import MoELayer


class LabelRoutedModel(nn.Module):
    """Token t goes to expert t // 4 (router = identity on a one-hot group embedding)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 4)
        self.moe = MoELayer(4, 8, 4, 1)
        with torch.no_grad():
            self.embed.weight.copy_(10 * torch.eye(4).repeat_interleave(4, 0))
            self.moe.router.gate.weight.copy_(torch.eye(4))

    def forward(self, ids, attention_mask=None):
        mask = None if attention_mask is None else attention_mask.bool()
        _, decision = self.moe(self.embed(ids), token_mask_BS=mask)
        return SimpleNamespace(routing=[decision])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return MoEModel.from_preset("tiny").eval()


def test_specialization_nmi_near_one_when_labels_decide_routing():
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(80):
        label = i % 4
        n = int(torch.randint(3, 12, (1,), generator=g))  # ragged lengths -> padding must not count
        data.append((torch.randint(0, 4, (n,), generator=g) + 4 * label, f"class{label}"))
    spec = RouterAnalyzer(LabelRoutedModel(), batch_size=8).specialization(data)
    assert spec.nmi[0] > 0.99
    counts = torch.tensor(spec.counts[0])
    assert counts.sum() == sum(len(x) for x, _ in data)
    assert torch.equal(counts, torch.diag(counts.diagonal()))  # label i only on expert i
    assert spec.labels == ["class0", "class1", "class2", "class3"]
    assert spec.shares(0)[2] == [0.0, 0.0, 1.0, 0.0]


def test_specialization_nmi_near_zero_for_random_labels():
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randint(0, 16, (32,), generator=g), int(torch.randint(0, 4, (1,), generator=g)))
        for _ in range(100)
    ]
    spec = RouterAnalyzer(LabelRoutedModel(), batch_size=16).specialization(data, top1=False)
    assert spec.nmi[0] < 0.02


def test_nmi_reference_values():
    assert normalized_mutual_information(torch.eye(3) * 10) == pytest.approx(1.0)
    assert normalized_mutual_information(torch.ones(3, 4)) == pytest.approx(0.0, abs=1e-12)
    # sklearn-style arithmetic NMI of a hand-computed table
    c = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    p = c / 4
    mi = sum(
        float(p[i, j] * torch.log(p[i, j] / (p[i].sum() * p[:, j].sum())))
        for i in range(2)
        for j in range(2)
        if p[i, j] > 0
    )
    h = lambda v: -sum(float(x * torch.log(x)) for x in v if x > 0)  # noqa: E731
    assert normalized_mutual_information(c) == pytest.approx(2 * mi / (h(p.sum(1)) + h(p.sum(0))))


def test_analyze_batch_matches_model_output(tiny):
    ids = torch.randint(0, 256, (2, 8))
    layers = RouterAnalyzer(tiny).analyze_batch(ids)
    with torch.no_grad():
        out = tiny(ids)
    assert len(layers) == 2
    for layer, d in zip(layers, out.routing):
        assert layer.expert_indices.shape == (2, 8, 2)
        assert torch.equal(layer.expert_indices.reshape(-1, 2), d.expert_indices)
        assert torch.allclose(layer.combine_weights.reshape(-1, 2), d.combine_weights.float())
        assert torch.equal(layer.top1.reshape(-1), d.router_probs.argmax(-1))


def test_top_tokens_and_affinity(tiny):
    tok = ByteTokenizer()
    analyzer = RouterAnalyzer(tiny, tok)
    texts = ["hello world", "mixture of experts", "aaaa"]
    top = analyzer.top_tokens_per_expert(texts, k=3)
    assert len(top) == 2 and len(top[0]) == 4
    total = sum(c for expert in top[0] for _, c in expert)
    assert 0 < total <= 2 * sum(len(t) for t in texts)
    assert all(isinstance(t, str) for expert in top[0] for t, _ in expert)
    alone = analyzer.token_affinity(["a", "b"])
    assert alone[0].shape == (2, 4) and torch.allclose(alone[0].sum(-1), torch.ones(2), atol=1e-5)
    ctx = analyzer.token_affinity(["a", "z"], data=texts)
    assert ctx[0][1].abs().sum() == 0  # "z" never occurs
    assert torch.allclose(ctx[0][0].sum(), torch.tensor(1.0), atol=1e-5)
    with pytest.raises(ValueError, match="tokenizer"):
        RouterAnalyzer(tiny).top_tokens_per_expert(["text"])


def test_compare_checkpoints(tiny):
    data = [torch.randint(0, 256, (16,)) for _ in range(4)]
    same = compare_checkpoints(tiny, copy.deepcopy(tiny), data)
    assert all(c.top1_changed == 0.0 and c.mean_jaccard == 1.0 for c in same)
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        for layer in other.moe_layers():
            layer.router.gate.weight.mul_(-1.0)
    diff = compare_checkpoints(tiny, other, data)
    assert diff[0].num_tokens == 64
    assert diff[0].top1_changed > 0.5 and diff[0].mean_jaccard < 0.5
    assert sum(diff[0].load_a) == pytest.approx(1.0)
