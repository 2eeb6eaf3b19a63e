"""Compilation (``torch.compile``) and ONNX export of MoE models.

The training-time dispatch sorts tokens by expert and sizes its blocks from the data (``counts.tolist()``):
fast in eager mode, but a graph exporter cannot follow it. For export each MoE layer is swapped for
:class:`StaticMoE`, which computes every expert on every token and weights the outputs by the router's
combine weights (zero for unselected experts): the same function for dropless routing, with static shapes.
It costs E/k times the expert FLOPs, so it is for export and portability, not for speed; the exported
graph is checked against PyTorch with onnxruntime (:func:`verify_onnx`).

Example:
    >>> # path = export_onnx(model, "model.onnx"); verify_onnx(model, path)  # max abs diff of logits
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StaticMoE", "compile_model", "export_onnx", "static_moe", "verify_onnx"]


class StaticMoE(nn.Module):
    """Export-friendly stand-in for a dropless ``MoELayer``: all experts on all tokens, weighted combine."""

    def __init__(self, layer: Any) -> None:
        super().__init__()
        router = layer.router
        kind = type(router).__name__
        if kind == "ExpertChoiceRouter":
            raise ValueError(
                "ONNX export does not support router_type='expert_choice' (choices span the batch)"
            )
        cf = router.current_capacity_factor() if hasattr(router, "current_capacity_factor") else None
        if cf is not None:
            raise ValueError(
                "ONNX export needs dropless routing in eval mode: set eval_capacity_factor=None "
                f"(the router has capacity factor {cf})"
            )
        if not hasattr(layer.experts, "w1_EDF"):
            raise ValueError("ONNX export needs full expert weights (export before offloading/quantising)")
        self.layer = layer
        self.sigmoid = kind == "SigmoidBiasRouter"
        self.top_k = int(router.top_k)
        self.normalize = bool(getattr(router, "norm_topk_prob", self.sigmoid)) and self.top_k > 1
        self.scale = float(getattr(router, "routed_scaling_factor", 1.0))

    def forward(
        self, x_BSD: Tensor, token_mask_BS: Tensor | None = None, router_input_BSD: Tensor | None = None
    ) -> tuple[Tensor, None]:
        layer: Any = self.layer
        d = x_BSD.shape[-1]
        x_TD = x_BSD.reshape(-1, d)
        r_TD = x_TD if router_input_BSD is None else router_input_BSD.reshape(-1, d)
        logits_TE = F.linear(r_TD.float(), layer.router.gate.weight.float())
        probs_TE = torch.sigmoid(logits_TE) if self.sigmoid else torch.softmax(logits_TE, dim=-1)
        select_TE = probs_TE + layer.router.expert_bias.float()
        idx_TK = torch.topk(select_TE, self.top_k, dim=-1).indices
        w_TK = probs_TE.gather(1, idx_TK)
        if self.normalize:
            w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        w_TK = w_TK * self.scale
        w_TE = torch.zeros_like(probs_TE).scatter_add(1, idx_TK, w_TK).to(x_TD.dtype)
        ex = layer.experts
        h1_ETF = torch.einsum("td,edf->etf", x_TD, ex.w1_EDF.to(x_TD.dtype))
        if getattr(ex, "w3_EDF", None) is not None:
            h_ETF = F.silu(h1_ETF) * torch.einsum("td,edf->etf", x_TD, ex.w3_EDF.to(x_TD.dtype))
        else:
            h_ETF = F.gelu(h1_ETF)
        y_ETD = torch.einsum("etf,efd->etd", h_ETF, ex.w2_EFD.to(x_TD.dtype))
        out_TD = torch.einsum("te,etd->td", w_TE, y_ETD)
        if layer.shared_experts is not None:
            shared = layer.shared_experts(x_TD)
            if layer.shared_expert_gate is not None:
                shared = torch.sigmoid(layer.shared_expert_gate(x_TD)) * shared
            out_TD = out_TD + shared
        return out_TD.view(x_BSD.shape), None


@contextlib.contextmanager
def static_moe(model: Any) -> Iterator[Any]:
    """Temporarily swap every MoE layer for :class:`StaticMoE` and switch router losses off."""
    blocks = [blk for blk in model.layers if getattr(blk, "is_moe", False)]  # type: ignore[attr-defined]
    originals = [blk.mlp for blk in blocks]
    cfg = model.config  # type: ignore[attr-defined]
    try:
        for blk in blocks:
            blk.mlp = StaticMoE(blk.mlp)
        model.config = cfg.model_copy(update={"aux_loss_coef": 0.0, "z_loss_coef": 0.0})  # type: ignore[assignment]
        yield model
    finally:
        for blk, orig in zip(blocks, originals):
            blk.mlp = orig
        model.config = cfg  # type: ignore[assignment]


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        # an explicit all-ones mask takes the masked attention path: SDPA's is_causal flag cannot be symbolic
        return self.model(input_ids, attention_mask=torch.ones_like(input_ids)).logits  # type: ignore[no-any-return]


def export_onnx(
    model: Any,
    path: str | os.PathLike[str],
    *,
    example_length: int = 16,
    opset_version: int = 18,
) -> Path:
    """Export ``input_ids [batch, seq] -> logits [batch, seq, vocab]`` to ONNX with dynamic batch and sequence.

    The model is put in eval mode. Check the result with :func:`verify_onnx`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    vocab = int(model.config.vocab_size)  # type: ignore[attr-defined]
    example = torch.randint(0, vocab, (2, example_length))
    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=2, max=int(model.config.max_seq_len))  # type: ignore[attr-defined]
    with torch.no_grad(), static_moe(model):
        program = torch.onnx.export(
            _LogitsOnly(model).eval(),
            (example,),
            dynamo=True,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}},
            opset_version=opset_version,
            verbose=False,
        )
        if program is None:  # pragma: no cover - older torch wrote the file itself
            raise RuntimeError("torch.onnx.export returned no program")
        tmp = path.with_name(f".{path.name}.tmp")
        program.save(str(tmp))
        os.replace(tmp, path)
    return path


def verify_onnx(model: Any, path: str | os.PathLike[str], inputs: Tensor | None = None) -> float:
    """Run the ONNX file with onnxruntime and the model with PyTorch; return the max abs logit difference."""
    import onnxruntime as ort

    model.eval()
    vocab = int(model.config.vocab_size)  # type: ignore[attr-defined]
    if inputs is None:
        inputs = torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(0))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (onnx_logits,) = sess.run(["logits"], {"input_ids": inputs.numpy().astype("int64")})
    with torch.no_grad():
        ref = model(inputs).logits
    return float((torch.from_numpy(onnx_logits) - ref).abs().max())


def compile_model(
    model: nn.Module, *, mode: str | None = None, dynamic: bool | None = True, **kw: Any
) -> nn.Module:
    """``torch.compile`` with inductor (CPU or CUDA). The dispatch's data-dependent sizes cause graph
    breaks around the expert blocks; attention, norms and the dense parts are compiled.

    On CPU the MoE layers are switched to the per-expert ``loop`` implementation first: in torch 2.13 the
    fake-tensor kernel of ``torch._grouped_mm`` accepts only bf16, so fp32 grouped matmuls cannot be traced.
    """
    for layer in getattr(model, "moe_layers", list)():
        if layer.impl in ("auto", "grouped_mm") and next(model.parameters()).device.type == "cpu":
            layer.impl = "loop"
    return torch.compile(model, backend="inductor", mode=mode, dynamic=dynamic, **kw)  # type: ignore[return-value]
