"""LoRA for MoE models: attention projections, dense/shared FFNs, and stacked expert weights.

Shape legend: N token-slots sorted by expert, E experts, D model dim, F expert FFN dim, r LoRA rank,
X/Y the input/output width of one adapted weight.

Expert adapters work on the activations, like the attention ones (no ``[E, D, F]`` weight delta is built in
the forward pass): for a stacked weight ``w_EXY`` the rows of expert ``e`` compute
``x @ w[e] + scale * (dropout(x) @ A[e]) @ B[e]`` with ``A_EXr``/``B_ErY`` per expert
(``expert_wise_adaptation=True``) or a single ``A_Xr``/``B_rY`` shared by all experts. ``scale = alpha / r``;
``B`` starts at zero, so a fresh adapter leaves the model's outputs unchanged. :meth:`MoELoRA.merge` folds
``scale * A @ B`` into the base weights and removes the wrappers (the tests check merged == unmerged).

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
import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moe_lab.config import Config, atomic_write_text
from moe_lab.nn.experts import Experts, grouped_matmul, has_grouped_mm

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


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))`` around an ``nn.Linear`` (A: [r, in], B: [out, r])."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return self.base_layer(x) + F.linear(F.linear(self.dropout(x), a), b) * self.scale

    def delta(self) -> Tensor:
        """The merged update ``scale * B @ A`` (shape of the base weight)."""
        return (self.lora_B @ self.lora_A) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base_layer.weight += self.delta().to(self.base_layer.weight.dtype)
        return self.base_layer


class LoRAExperts(nn.Module):
    """Stacked :class:`~moe_lab.nn.experts.Experts` with adapters on ``w1_EDF``/``w3_EDF``/``w2_EFD``.

    Same call signature as the wrapped experts (``forward(x_ND, counts, impl)``, ``forward_capacity``);
    other attributes (``num_experts``, ``w1_EDF``, ...) are read from the base.
    """

    def __init__(
        self, base: Experts, rank: int, alpha: float, dropout: float, expert_wise: bool, weights: list[str]
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.scale = alpha / rank
        self.expert_wise = expert_wise
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in weights:
            w = getattr(base, f"{name}_EFD" if name == "w2" else f"{name}_EDF", None)
            if w is None:
                continue  # GELU experts have no w3
            e, x_dim, y_dim = w.shape
            lead = (e,) if expert_wise else ()
            a = w.new_empty(*lead, x_dim, rank)
            for i in range(e if expert_wise else 1):  # kaiming-uniform per expert, like nn.Linear's init
                nn.init.kaiming_uniform_((a[i] if expert_wise else a).T, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(w.new_zeros(*lead, rank, y_dim))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_layer"], name)

    def _lora(self, name: str, x_ND: Tensor, counts: list[int], offs: Tensor | None, impl: str) -> Tensor:
        a, b = self.lora_A[name].to(x_ND.dtype), self.lora_B[name].to(x_ND.dtype)
        xd = self.dropout(x_ND)
        if not self.expert_wise:
            return (xd @ a) @ b * self.scale
        rank = a.shape[-1]
        # grouped_mm needs 16-byte aligned strides; fall back to the loop for odd ranks.
        small = impl if (rank * x_ND.element_size()) % 16 == 0 else "loop"
        h = grouped_matmul(xd, a, counts, offs if small == "grouped_mm" else None, small)
        return grouped_matmul(h, b, counts, offs if small == "grouped_mm" else None, small) * self.scale

    def forward(self, x_ND: Tensor, counts: list[int], impl: str = "auto") -> Tensor:
        base = self.base_layer
        if impl == "auto":
            impl = "grouped_mm" if has_grouped_mm() else "loop"
        if len(counts) != base.num_experts or sum(counts) != x_ND.shape[0]:
            raise ValueError(f"counts must have {base.num_experts} entries summing to {x_ND.shape[0]}")
        offs = None
        if impl == "grouped_mm":
            offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x_ND.device)

        def proj(name: str, w: Tensor, x: Tensor) -> Tensor:
            y = grouped_matmul(x, w.to(x.dtype), counts, offs, impl)
            return y + self._lora(name, x, counts, offs, impl) if name in self.lora_A else y

        h1 = proj("w1", base.w1_EDF, x_ND)
        h3 = proj("w3", base.w3_EDF, x_ND) if base.w3_EDF is not None else None
        return proj("w2", base.w2_EFD, base._hidden(h1, h3))

    def forward_capacity(self, x_ECD: Tensor) -> Tensor:
        base = self.base_layer

        def proj(name: str, w: Tensor, x: Tensor) -> Tensor:
            y = torch.bmm(x, w.to(x.dtype))
            if name not in self.lora_A:
                return y
            a, b = self.lora_A[name].to(x.dtype), self.lora_B[name].to(x.dtype)
            xd = self.dropout(x)
            return y + (torch.bmm(torch.bmm(xd, a), b) if self.expert_wise else (xd @ a) @ b) * self.scale

        h1 = proj("w1", base.w1_EDF, x_ECD)
        h3 = proj("w3", base.w3_EDF, x_ECD) if base.w3_EDF is not None else None
        return proj("w2", base.w2_EFD, base._hidden(h1, h3))

    def delta(self, name: str) -> Tensor:
        """The merged update of one stacked weight, ``[E, X, Y]``."""
        a, b = self.lora_A[name], self.lora_B[name]
        d = torch.bmm(a, b) if self.expert_wise else (a @ b)[None]
        return d * self.scale

    def merged(self) -> Experts:
        base = self.base_layer
        with torch.no_grad():
            for name in self.lora_A:
                w = getattr(base, f"{name}_EFD" if name == "w2" else f"{name}_EDF")
                w += self.delta(name).to(w.dtype)
        return base


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
