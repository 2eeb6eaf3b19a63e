"""ModelConfig reproduces Hugging Face Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE forward passes.

Tiny randomly initialised HF models (built from a config, nothing downloaded) and a test-only weight mapping;
the real import/export lives in ``moe_lab.interop``. This checks the architecture side: norms, rotary, GQA,
QK-norm placement, router softmax/top-k/renormalisation, shared expert gate, sparse-step layouts.
"""

from __future__ import annotations

import pytest
import torch

from moe_lab.models import MoEModel

transformers = pytest.importorskip("transformers")

COMMON_HF = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)
COMMON = dict(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=64)


def _convert(hf_state: dict[str, torch.Tensor], ffn: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, v in hf_state.items():
        k = key.removeprefix("model.")
        if k.endswith("mlp.experts.gate_up_proj"):  # [E, 2F, D], gate rows first
            out[k.replace("gate_up_proj", "w1_EDF")] = v[:, :ffn].transpose(1, 2)
            out[k.replace("gate_up_proj", "w3_EDF")] = v[:, ffn:].transpose(1, 2)
        elif k.endswith("mlp.experts.down_proj"):  # [E, D, F]
            out[k.replace("down_proj", "w2_EFD")] = v.transpose(1, 2)
        elif k.endswith("mlp.gate.weight"):
            out[k.replace("mlp.gate.weight", "mlp.router.gate.weight")] = v
        elif ".mlp.shared_expert." in k:
            for hf_name, ours in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                k = k.replace(f"shared_expert.{hf_name}", f"shared_experts.{ours}")
            out[k] = v
        else:
            out[k] = v
    return out


CASES = {
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(
            intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            rms_norm_eps=1e-5,
        ),
        dict(
            ffn_hidden_size=16,
            num_experts=8,
            experts_per_token=2,
            norm_topk_prob=False,
            qk_norm="full",
            rms_norm_eps=1e-5,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
        ),
        dict(ffn_hidden_size=16, num_experts=4, experts_per_token=2, rope_theta=1e6, rms_norm_eps=1e-5),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            mlp_only_layers=[],
            rope_theta=1e6,
            qkv_bias=True,
        ),
        dict(
            ffn_hidden_size=16,
            dense_ffn_hidden_size=40,
            num_experts=6,
            experts_per_token=2,
            norm_topk_prob=False,
            moe_layer_frequency=2,
            moe_layer_offset=1,
            num_shared_experts=1,
            shared_expert_hidden_size=24,
            shared_expert_gate=True,
            attention_bias=True,
            rope_theta=1e6,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            head_dim=16,
            intermediate_size=40,
            moe_intermediate_size=16,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            rope_theta=1e6,
        ),
        dict(
            head_dim=16,
            ffn_hidden_size=16,
            dense_ffn_hidden_size=40,
            num_experts=6,
            experts_per_token=2,
            moe_layers=[0, 2],
            qk_norm="per_head",
            rope_theta=1e6,
        ),
    ),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_logits_match_hugging_face(family):
    cfg_name, model_name, hf_kw, our_kw = CASES[family]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers has no {model_name}")
    torch.manual_seed(0)
    hf_cfg = getattr(transformers, cfg_name)(**COMMON_HF, **hf_kw)
    hf_cfg._attn_implementation = "sdpa"
    hf = getattr(transformers, model_name)(hf_cfg).eval()
    with torch.no_grad():  # larger weights than HF's init so that differences would show
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    ours = MoEModel(**COMMON, **our_kw).eval()
    missing, unexpected = ours.load_state_dict(
        _convert(hf.state_dict(), our_kw["ffn_hidden_size"]), strict=False
    )
    assert unexpected == [] and all(k.endswith("router.expert_bias") for k in missing)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    assert ref.abs().max() > 1.0  # non-trivial logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
