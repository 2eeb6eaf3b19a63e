"""Tensor-name mapping between Hugging Face MoE checkpoints (as stored on disk) and moe-lab's ``MoEModel``.

On disk, ``transformers`` keeps one tensor per expert (``experts.{e}.w1.weight`` ``[F, D]`` for Mixtral,
``experts.{e}.gate_proj.weight`` for OLMoE/Qwen) and converts to fused 3-D tensors only in memory; moe-lab
stacks them as ``w1_EDF [E, D, F]`` (transposed). Reading also accepts the fused on-disk layout
(``experts.gate_up_proj [E, 2F, D]``, ``experts.down_proj [E, D, F]``).

Example:
    >>> hf_prefix("mixtral", 3)
    'model.layers.3.block_sparse_moe'
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moe_lab.interop.hf_config import HFArch

__all__ = ["hf_prefix", "hf_to_moe_state", "moe_to_hf_state"]

# moe-lab name -> HF name, for everything outside the FFN (same names, HF adds "model.").
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
# moe-lab shared-expert linear -> HF shared_expert linear (Qwen2-MoE)
_SHARED = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
# per-expert HF names: (gate, up, down)
_EXPERT_NAMES = {
    "mixtral": ("w1", "w3", "w2"),
    "olmoe": ("gate_proj", "up_proj", "down_proj"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
}


def hf_prefix(family: str, layer: int) -> str:
    """Prefix of the sparse-MoE block of ``layer`` in a Hugging Face checkpoint."""
    return f"model.layers.{layer}.{'block_sparse_moe' if family == 'mixtral' else 'mlp'}"


def _simple_pairs(arch: HFArch) -> list[tuple[str, str]]:
    """(moe-lab key, HF key) pairs that map one to one without reshaping."""
    pairs = [("embed_tokens.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    if not arch.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    for i in range(arch.num_layers):
        ours, theirs = f"layers.{i}", f"model.layers.{i}"
        for n in ("input_layernorm", "post_attention_layernorm"):
            pairs.append((f"{ours}.{n}.weight", f"{theirs}.{n}.weight"))
        for p in _ATTN:
            pairs.append((f"{ours}.self_attn.{p}.weight", f"{theirs}.self_attn.{p}.weight"))
            has_bias = arch.o_bias if p == "o_proj" else arch.qkv_bias
            if has_bias:
                pairs.append((f"{ours}.self_attn.{p}.bias", f"{theirs}.self_attn.{p}.bias"))
        if arch.qk_norm != "none":
            for n in ("q_norm", "k_norm"):
                pairs.append((f"{ours}.self_attn.{n}.weight", f"{theirs}.self_attn.{n}.weight"))
        if i not in arch.moe_layers:
            for n in ("gate_proj", "up_proj", "down_proj"):
                pairs.append((f"{ours}.mlp.{n}.weight", f"{theirs}.mlp.{n}.weight"))
            continue
        pre = hf_prefix(arch.family, i)
        pairs.append((f"{ours}.mlp.router.gate.weight", f"{pre}.gate.weight"))
        if arch.shared_expert_size:
            for mine, hf in _SHARED.items():
                pairs.append((f"{ours}.mlp.shared_experts.{mine}.weight", f"{pre}.shared_expert.{hf}.weight"))
            if arch.shared_expert_gate:
                pairs.append((f"{ours}.mlp.shared_expert_gate.weight", f"{pre}.shared_expert_gate.weight"))
    return pairs


class _Source:
    """Pops tensors from the HF state with errors that name the tensor."""

    def __init__(self, state: dict[str, Tensor], where: str) -> None:
        self.state = dict(state)
        self.where = where

    def pop(self, key: str) -> Tensor:
        if key not in self.state:
            raise ValueError(
                f"{self.where}: missing tensor '{key}' (is the checkpoint of another family/shape?)"
            )
        return self.state.pop(key)


def _check(key: str, got: Tensor, want: tuple[int, ...], where: str, source: str | None = None) -> None:
    if tuple(got.shape) != want:
        raise ValueError(
            f"{where}: tensor '{source or key}' has shape {tuple(got.shape)} but config.json implies {want} "
            "(a checkpoint of a different family or size?)"
        )


def hf_to_moe_state(
    hf_state: dict[str, Tensor], arch: HFArch, expected: dict[str, tuple[int, ...]], where: str = "checkpoint"
) -> dict[str, Tensor]:
    """HF on-disk tensors -> moe-lab state dict; every shape is checked against ``expected`` (moe-lab key ->
    shape) and leftover HF tensors are an error naming them."""
    src = _Source(hf_state, where)
    out: dict[str, Tensor] = {}
    for mine, hf in _simple_pairs(arch):
        if mine not in expected:
            raise ValueError(f"{where}: internal mapping error: the model has no '{mine}'")
        t = src.pop(hf)
        _check(mine, t, expected[mine], where, hf)
        out[mine] = t
    gate_n, up_n, down_n = _EXPERT_NAMES[arch.family]
    for i in arch.moe_layers:
        pre = f"{hf_prefix(arch.family, i)}.experts"
        ours = f"layers.{i}.mlp.experts"
        e, d, f = expected[f"{ours}.w1_EDF"]
        if f"{pre}.gate_up_proj" in src.state:  # fused layout
            gu = src.pop(f"{pre}.gate_up_proj")
            _check(f"{ours}.w1_EDF", gu, (e, 2 * f, d), where, f"{pre}.gate_up_proj")
            down = src.pop(f"{pre}.down_proj")
            _check(f"{ours}.w2_EFD", down, (e, d, f), where, f"{pre}.down_proj")
            out[f"{ours}.w1_EDF"] = gu[:, :f].transpose(1, 2).contiguous()
            out[f"{ours}.w3_EDF"] = gu[:, f:].transpose(1, 2).contiguous()
            out[f"{ours}.w2_EFD"] = down.transpose(1, 2).contiguous()
            continue
        stacks: dict[str, list[Tensor]] = {"w1": [], "w3": [], "w2": []}
        for x in range(e):
            for mine, hf_n, shape in (("w1", gate_n, (f, d)), ("w3", up_n, (f, d)), ("w2", down_n, (d, f))):
                key = f"{pre}.{x}.{hf_n}.weight"
                t = src.pop(key)
                _check(key, t, shape, where)
                stacks[mine].append(t.t())
        out[f"{ours}.w1_EDF"] = torch.stack(stacks["w1"]).contiguous()
        out[f"{ours}.w3_EDF"] = torch.stack(stacks["w3"]).contiguous()
        out[f"{ours}.w2_EFD"] = torch.stack(stacks["w2"]).contiguous()
    if arch.tie_embeddings:
        src.state.pop("lm_head.weight", None)
    leftover = sorted(
        k for k in src.state if not k.endswith(("rotary_emb.inv_freq", ".shared_expert_gate.bias"))
    )
    if leftover:
        more = f" (+{len(leftover) - 3} more)" if len(leftover) > 3 else ""
        raise ValueError(
            f"{where}: unexpected tensor(s) {leftover[:3]}{more} for a {arch.family} model with this config.json "
            "(a checkpoint of a different family or layout?)"
        )
    return out


def moe_to_hf_state(
    state: dict[str, Tensor], arch: HFArch, convert: Callable[[Tensor], Tensor] | None = None
) -> dict[str, Tensor]:
    """moe-lab state dict -> HF on-disk tensors (per-expert layout, as ``save_pretrained`` writes)."""
    conv = convert or (lambda t: t)
    out: dict[str, Tensor] = {}
    for mine, hf in _simple_pairs(arch):
        if mine not in state:
            raise ValueError(f"model state has no '{mine}' (needed for {hf})")
        out[hf] = conv(state[mine].detach())
    gate_n, up_n, down_n = _EXPERT_NAMES[arch.family]
    for i in arch.moe_layers:
        pre = f"{hf_prefix(arch.family, i)}.experts"
        ours = f"layers.{i}.mlp.experts"
        w1, w3, w2 = state[f"{ours}.w1_EDF"], state[f"{ours}.w3_EDF"], state[f"{ours}.w2_EFD"]
        for x in range(w1.shape[0]):
            out[f"{pre}.{x}.{gate_n}.weight"] = conv(w1[x].t().contiguous())
            out[f"{pre}.{x}.{up_n}.weight"] = conv(w3[x].t().contiguous())
            out[f"{pre}.{x}.{down_n}.weight"] = conv(w2[x].t().contiguous())
    return out
