"""Generation: cache == no cache, batched == unbatched, reproducible filtered sampling, stopping."""

from __future__ import annotations

import pytest
import torch

from moe_lab.inference import GenerationConfig, filter_logits, generate, sample_next_token
from moe_lab.models import MoEModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # a large init spreads the logits so greedy decoding does not just repeat one token
    return MoEModel(
        vocab_size=48,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=32,
        num_experts=4,
        experts_per_token=2,
        init_std=0.3,
        max_seq_len=40,
    ).eval()


PROMPTS = [[5, 6, 7, 8, 9], [11, 3], [1, 2, 3]]


def test_cached_generation_equals_uncached(model):
    a = generate(model, PROMPTS, max_new_tokens=12, use_cache=True)
    b = generate(model, PROMPTS, max_new_tokens=12, use_cache=False)
    assert a.new_tokens == b.new_tokens
    assert all(len(set(t)) > 2 for t in a.new_tokens)  # a meaningful check: varied continuations
    assert torch.equal(a.sequences, b.sequences)


def test_left_padded_batch_equals_single_prompts(model):
    batched = generate(model, PROMPTS, max_new_tokens=10)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, prompt, max_new_tokens=10)
        assert alone.new_tokens[0] == batched.new_tokens[i]
    assert batched.sequences.shape == (3, 5 + 10)
    assert batched.attention_mask[1].tolist() == [0, 0, 0] + [1] * 12
    # the same batch given as a padded tensor + mask
    ids = batched.sequences[:, :5]
    mask = batched.attention_mask[:, :5]
    again = generate(model, ids, attention_mask=mask, max_new_tokens=10)
    assert again.new_tokens == batched.new_tokens


def test_sampling_is_reproducible_with_a_seed(model):
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=10, top_p=0.9)
    a = generate(model, PROMPTS, seed=123, **kw)
    b = generate(model, PROMPTS, seed=123, **kw)
    c = generate(model, PROMPTS, seed=7, **kw)
    assert a.new_tokens == b.new_tokens
    assert a.new_tokens != c.new_tokens
    greedy = generate(model, PROMPTS, max_new_tokens=10)
    assert greedy.new_tokens != a.new_tokens


def test_filters_against_reference():
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    out = filter_logits(logits, top_k=5)
    for row, ref in zip(out, logits):
        kept = set(torch.nonzero(torch.isfinite(row)).flatten().tolist())
        assert kept == set(torch.topk(ref, 5).indices.tolist())
    out = filter_logits(logits, top_p=0.5)
    for row, ref in zip(out, logits):
        probs = torch.softmax(ref, -1)
        order = torch.argsort(probs, descending=True).tolist()
        want, mass = [], 0.0
        for idx in order:  # smallest prefix whose mass reaches top_p
            want.append(idx)
            mass += float(probs[idx])
            if mass >= 0.5:
                break
        assert set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) == set(want)
    tiny_p = filter_logits(logits, top_p=1e-6)
    assert (torch.isfinite(tiny_p).sum(-1) == 1).all()  # the most likely token always stays


def test_samples_respect_the_filters():
    torch.manual_seed(2)
    logits = torch.randn(2, 30).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    tokens = sample_next_token(logits, temperature=2.0, top_k=3, generator=gen)
    for row, tok in zip(logits, tokens):
        assert int(tok) in torch.topk(row, 3).indices.tolist()
    assert len(set(tokens.tolist())) > 2  # it really samples
    assert torch.equal(sample_next_token(logits, temperature=0.0), logits.argmax(-1))


def test_stop_token_ids_and_eos(model):
    base = generate(model, PROMPTS, max_new_tokens=12)
    stop = base.new_tokens[0][3]
    out = generate(model, PROMPTS, max_new_tokens=12, eos_token_id=stop, pad_token_id=0)
    first = base.new_tokens[0].index(stop)
    assert out.new_tokens[0] == base.new_tokens[0][: first + 1]
    assert out.finish_reason[0] == "stop"
    assert (
        out.sequences[0, 5 + first + 1 :].eq(0).all() and out.attention_mask[0, 5 + first + 1 :].eq(0).all()
    )
    for i in (1, 2):
        if stop in base.new_tokens[i]:
            assert out.finish_reason[i] == "stop"
        else:
            assert out.finish_reason[i] == "length" and out.new_tokens[i] == base.new_tokens[i]
    out2 = generate(model, PROMPTS[:1], max_new_tokens=12, stop_token_ids=[stop])
    assert out2.new_tokens[0] == out.new_tokens[0]


class _Tok:
    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings(model):
    tok = _Tok()
    base = generate(model, PROMPTS[:1], max_new_tokens=12)
    text = tok.decode(base.new_tokens[0])
    target = text[4:6]
    out = generate(model, PROMPTS[:1], max_new_tokens=12, stop_strings=[target], tokenizer=tok)
    assert out.finish_reason == ["stop"]
    produced = tok.decode(out.new_tokens[0])
    assert produced.endswith(target) and target not in produced[:-1]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, PROMPTS, max_new_tokens=2, stop_strings=["x"])


def test_length_limits_and_errors(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, list(range(41)), max_new_tokens=1)
    out = generate(model, list(range(38)), max_new_tokens=10)
    assert len(out.new_tokens[0]) == 2 and out.finish_reason == ["length"]
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], max_new_tokens=1)
    assert generate(model, [1, 2], max_new_tokens=0).new_tokens == [[]]


def test_routing_per_step_and_config_object(model):
    cfg = GenerationConfig(max_new_tokens=3, return_routing=True)
    out = generate(model, PROMPTS, config=cfg)
    assert len(out.routing) == 3 and all(len(step) == 2 for step in out.routing)
    assert out.routing[0][0].num_tokens == 3 * 5  # the prompt step
    assert out.routing[1][0].num_tokens == 3
    assert not out.routing[1][0].router_logits.requires_grad
    assert model.training is False
    with pytest.raises(Exception, match="temperature"):
        GenerationConfig(temperature=-1)
