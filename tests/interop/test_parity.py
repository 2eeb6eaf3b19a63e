"""Parity with ``transformers`` on tiny random checkpoints of each family: logits, router choices, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import VOCAB
from moe_lab.interop import load_pretrained, save_pretrained_hf

transformers = pytest.importorskip("transformers")

CASES = {
    "mixtral": {},
    "olmoe": {"eos_token_id": 2, "pad_token_id": 1},
    "olmoe-normtopk-bias": {
        "norm_topk_prob": True,
        "attention_bias": True,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "qwen2_moe": {},
    "qwen2_moe-sparse-step": {"decoder_sparse_step": 2, "norm_topk_prob": True},
    "qwen3_moe": {"mlp_only_layers": [1]},
    "mixtral-tied": {"tie_word_embeddings": True},
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _forward_both(hf, ours, ids, mask=None):
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, output_router_logits=True)
        out = ours(ids, attention_mask=mask)
    return ref, out


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_routing_match_transformers(case: str, hf_checkpoint, tmp_path: Path) -> None:
    family = case.split("-")[0]
    hf, folder = hf_checkpoint(family, **CASES[case])
    model = load_pretrained(folder).eval()
    if "tied" in case:
        assert model.lm_head.weight is model.embed_tokens.weight
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12))
    ref, out = _forward_both(hf, model, ids)
    assert _rel(out.logits, ref.logits) < 1e-5
    # router choices: same top-k experts for every token of every MoE layer
    assert len(out.routing) == len(ref.router_logits)
    k = hf.config.num_experts_per_tok
    for decision, hf_logits in zip(out.routing, ref.router_logits):
        torch.testing.assert_close(decision.router_logits.float(), hf_logits.float(), rtol=1e-5, atol=1e-5)
        hf_top = torch.topk(torch.softmax(hf_logits.float(), -1), k, dim=-1).indices.sort(-1).values
        assert torch.equal(decision.expert_indices.sort(-1).values, hf_top)

    # export -> transformers' own from_pretrained -> same logits again
    out_dir = save_pretrained_hf(model, tmp_path / "export", max_shard_size="40KB")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        again = hf2(ids).logits
    assert _rel(again, ref.logits) < 1e-5
    assert type(hf2).__name__ == type(hf).__name__


def test_padding_mask_matches_transformers(hf_checkpoint) -> None:
    hf, folder = hf_checkpoint("qwen2_moe")
    model = load_pretrained(folder).eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    ref, out = _forward_both(hf, model, ids, mask)
    real = mask.bool()
    assert _rel(out.logits[real], ref.logits[real]) < 1e-5


def test_sharded_checkpoint_import(hf_checkpoint) -> None:
    hf, folder = hf_checkpoint("mixtral", max_shard_size="20KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 3 and (folder / "model.safetensors.index.json").is_file()
    model = load_pretrained(folder).eval()
    ids = torch.randint(0, VOCAB, (1, 9))
    ref, out = _forward_both(hf, model, ids)
    assert _rel(out.logits, ref.logits) < 1e-5


def test_round_trip_is_bit_exact(hf_checkpoint, tmp_path: Path) -> None:
    _, folder = hf_checkpoint("qwen3_moe", mlp_only_layers=[0])
    first = load_pretrained(folder)
    save_pretrained_hf(first, tmp_path / "rt")
    second = load_pretrained(tmp_path / "rt")
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert second.config == first.config


def test_bf16_export_and_dtype_load(hf_checkpoint, tmp_path: Path) -> None:
    _, folder = hf_checkpoint("olmoe", eos_token_id=2, pad_token_id=1)
    model = load_pretrained(folder)
    save_pretrained_hf(model, tmp_path / "bf16", dtype=torch.bfloat16)
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert next(hf2.parameters()).dtype == torch.bfloat16
    back = load_pretrained(tmp_path / "bf16", dtype=torch.float32)
    w = back.layers[0].mlp.experts.w1_EDF
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, model.layers[0].mlp.experts.w1_EDF, rtol=1e-2, atol=1e-2)
