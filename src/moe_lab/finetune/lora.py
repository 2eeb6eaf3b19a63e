"""LoRA for MoE models: attention projections, dense/shared FFNs, and stacked expert weights.

Shape legend: N token-slots sorted by expert, E experts, D model dim, F expert FFN dim, r LoRA rank,
X/Y the input/output width of one adapted weight.

Expert adapters work on the activations, like the attention ones (no ``[E, D, F]`` weight delta is built in
the forward pass): for a stacked weight ``w_EXY`` the rows of expert ``e`` compute
``x @ w[e] + scale * (dropout(x) @ A[e]) @ B[e]`` with ``A_EXr``/``B_ErY`` per expert
(``expert_wise_adaptation=True``) or a single ``A_Xr``/``B_rY`` shared by all experts. ``scale = alpha / r``;
``B`` starts at zero, so a fresh adapter leaves the model's outputs unchanged. With ``fused_gate_up`` the gate
and up weights share one adapter (``A_EDr``, ``B_Er(2F)``), as peft adapts Mixtral's fused ``gate_up_proj``.
Base product and update run as one autograd node (:func:`moe_lab.finetune.lora_layers.lora_matmul`): the
scale is applied on the ``[N, r]`` activation, the update is added in place, frozen base weights get no
gradient. :meth:`MoELoRA.merge` folds ``scale * A @ B`` into the base weights and removes the wrappers (the
tests check merged == unmerged).

Example:
    >>> from moe_lab.models import MoEModel
    >>> from moe_lab.finetune.lora import LoRAConfig, apply_lora
    >>> model = MoEModel.from_preset("tiny")
    >>> lora = apply_lora(model, LoRAConfig(rank=4, alpha=8, target_modules=["attention", "experts"]))
    >>> lora.num_trainable() < model.num_params()
    True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moe_lab.config import Config, atomic_write_text
from moe_lab.finetune.lora_layers import LoRAExperts, LoRALinear
from moe_lab.nn.experts import Experts

__all__ = [
    "LoRAConfig",
    "LoRAExperts",
    "LoRALinear",
    "MoELoRA",
    "apply_lora",
    "load_adapter",
    "read_adapter_config",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TARGETS = ("attention", "experts", "shared_experts", "dense_ffn", "q_proj", "k_proj", "v_proj", "o_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ExpertWeight = Literal["w1", "w2", "w3"]


def _all_expert_weights() -> list[ExpertWeight]:
    return ["w1", "w2", "w3"]


class LoRAConfig(Config):
    """Low-rank adapters: which weights, rank, scaling, dropout."""

    rank: int = Field(default=8, ge=1)
    """r, the inner dimension of each adapter."""
    alpha: float = Field(default=16.0, gt=0)
    """Scaling numerator: updates are multiplied by alpha / rank."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapter input (training only)."""
    target_modules: list[str] = Field(default_factory=lambda: ["attention", "experts"])
    """Any of attention (q/k/v/o), q_proj, k_proj, v_proj, o_proj, experts (stacked routed experts),
    shared_experts, dense_ffn (dense FFN layers)."""
    expert_weights: list[ExpertWeight] = Field(default_factory=_all_expert_weights)
    """Which stacked expert weights get adapters (w1 gate, w3 up, w2 down)."""
    expert_wise_adaptation: bool = True
    """True: separate A/B per expert ([E, X, r], [E, r, Y]); False: one A/B shared by every expert."""
    fused_gate_up: bool = False
    """One adapter on the gate and up weights together (``[w1 | w3]``, A shared, B ``[r, 2F]`` per expert),
    as peft adapts Mixtral's fused ``gate_up_proj``; False: separate adapters on w1 and w3."""
    train_routers: bool = False
    """Also train the router gates (full weights, not LoRA) while the base model is frozen."""

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        bad = [t for t in value if t not in TARGETS]
        if bad:
            raise ValueError(f"unknown target(s) {bad}; expected any of {list(TARGETS)}")
        if not value:
            raise ValueError("needs at least one target")
        return value


def _set_child(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _targets(model: nn.Module, cfg: LoRAConfig) -> list[tuple[str, str]]:
    """``(module path, kind)`` of every module to wrap."""
    wanted = set(cfg.target_modules)
    attn = set(_ATTN) if "attention" in wanted else wanted & set(_ATTN)
    out: list[tuple[str, str]] = []
    for name, mod in model.named_modules():
        leaf = name.rpartition(".")[2]
        parent = name.rpartition(".")[0]
        parent_leaf = parent.rpartition(".")[2]
        if isinstance(mod, Experts) and "experts" in wanted:
            out.append((name, "experts"))
            continue
        if not isinstance(mod, nn.Linear):
            continue
        is_attn = leaf in attn and parent_leaf == "self_attn"
        is_shared = "shared_experts" in wanted and parent_leaf == "shared_experts"
        is_dense = (
            "dense_ffn" in wanted and leaf in ("gate_proj", "up_proj", "down_proj") and parent_leaf == "mlp"
        )
        if is_attn or is_shared or is_dense:
            out.append((name, "linear"))
    return out


class MoELoRA:
    """Handle on a model with LoRA adapters: trainable params, save/load, merge.

    Created by :func:`apply_lora` / :func:`load_adapter`; the model itself is modified in place.
    """

    def __init__(self, model: nn.Module, config: LoRAConfig, adapters: dict[str, nn.Module]) -> None:
        self.model = model
        self.config = config
        self.adapters = adapters

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Only the LoRA tensors, keyed ``<module path>.lora_A[.w1]`` ..."""
        out: dict[str, Tensor] = {}
        for path, mod in self.adapters.items():
            for name, p in mod.named_parameters():
                if name.startswith("lora_"):
                    out[f"{path}.{name}"] = p.detach()
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def save_adapter(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        tmp = out / f".{ADAPTER_WEIGHTS}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / ADAPTER_WEIGHTS)
        self.save_config(out)
        return out

    def save_config(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write only ``adapter_config.json`` (what :func:`apply_lora_from_config` needs)."""
        meta: dict[str, Any] = {"format": "moe-lab-lora", "version": 1, "lora": self.config.to_dict()}
        model_cfg = getattr(self.model, "config", None)
        if model_cfg is not None and hasattr(model_cfg, "to_dict"):
            meta["base_model_config"] = model_cfg.to_dict()
        path = Path(out_dir) / ADAPTER_CONFIG
        atomic_write_text(path, json.dumps(meta, indent=2, default=str) + "\n")
        return path

    def merge(self) -> nn.Module:
        """Fold every adapter into its base weight and unwrap; returns the (plain) model."""
        for path, mod in self.adapters.items():
            _set_child(self.model, path, mod.merged())  # type: ignore[operator]
        self.adapters = {}
        return self.model


def apply_lora(model: nn.Module, config: LoRAConfig | None = None, *, freeze_base: bool = True) -> MoELoRA:
    """Wrap the targeted modules of ``model`` with LoRA adapters (in place) and return a :class:`MoELoRA`.

    With ``freeze_base`` every non-LoRA parameter gets ``requires_grad=False`` (router gates stay trainable
    when ``config.train_routers``).

    >>> import torch
    >>> from moe_lab.models import MoEModel
    >>> m = MoEModel.from_preset("tiny")
    >>> lora = apply_lora(m, LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    >>> sorted({k.rsplit(".", 2)[-2] for k in lora.adapter_state_dict()})
    ['q_proj', 'v_proj']
    """
    config = config or LoRAConfig()
    targets = _targets(model, config)
    if not targets:
        raise ValueError(f"LoRA target_modules {config.target_modules}: no matching module in the model")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    adapters: dict[str, nn.Module] = {}
    for path, kind in targets:
        base = model.get_submodule(path)
        wrapped: nn.Module
        if kind == "experts":
            assert isinstance(base, Experts)
            wrapped = LoRAExperts(
                base,
                config.rank,
                config.alpha,
                config.dropout,
                config.expert_wise_adaptation,
                list(config.expert_weights),
                config.fused_gate_up,
            )
        else:
            assert isinstance(base, nn.Linear)
            wrapped = LoRALinear(base, config.rank, config.alpha, config.dropout)
        wrapped.train(base.training)  # new modules start in training mode; follow the model
        _set_child(model, path, wrapped)
        adapters[path] = wrapped
    if config.train_routers:
        for name, p in model.named_parameters():
            if ".router." in f".{name}":
                p.requires_grad_(True)
    return MoELoRA(model, config, adapters)


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> LoRAConfig:
    """The :class:`LoRAConfig` stored in ``adapter_dir/adapter_config.json``."""
    cfg_path = Path(adapter_dir) / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not found")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        return LoRAConfig.from_dict(meta["lora"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{cfg_path}: not a moe-lab LoRA adapter config ({err})") from None


def load_adapter(
    model: nn.Module, adapter_dir: str | os.PathLike[str], *, freeze_base: bool = True
) -> MoELoRA:
    """Apply the adapter saved in ``adapter_dir`` to ``model`` (same architecture) and load its weights."""
    folder = Path(adapter_dir)
    cfg_path, w_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: not found (an adapter folder has {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
            )
    lora = apply_lora(model, read_adapter_config(folder), freeze_base=freeze_base)
    tensors = load_file(str(w_path))
    expected = lora.adapter_state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{w_path}: adapter does not fit this model (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    with torch.no_grad():
        for key, target in expected.items():
            if tensors[key].shape != target.shape:
                raise ValueError(
                    f"{w_path}: tensor '{key}' has shape {tuple(tensors[key].shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            target.copy_(tensors[key])
    return lora
