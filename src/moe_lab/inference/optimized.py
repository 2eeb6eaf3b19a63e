"""``OptimizedMoEModel``: an MoE model prepared for inference on memory-limited machines.

Three independent transformations of a built :class:`~moe_lab.models.MoEModel`, applied from outside the
model code:

- **selective expert loading** (``from_pretrained(..., expert_selection_strategy="frequency_based",
  num_experts_to_load=N)``): each MoE layer keeps only its N most used experts (by a usage profile recorded
  over calibration data); the router can no longer pick the others, so their tokens go to the best loaded
  expert. :meth:`perplexity` measures what that costs.
- **dynamic loading** (:meth:`enable_dynamic_loading`): experts live in safetensors files on disk
  (memory-mapped) or in host memory, and a bounded :class:`~moe_lab.inference.expert_cache.ExpertCache`
  holds ``cache_size`` of them in device memory, evicting by ``lru``, ``lfu``, ``lfu_admit``, ``weighted_lru``,
  ``markov`` or ``pin``; optional speculative prefetch of the next layer's experts. Outputs equal the fully
  loaded model.
- **weight-only quantisation** (:meth:`quantize`): int8 per channel or int4 in groups, per expert; routers,
  norms, attention and embeddings stay in full precision unless asked. :meth:`save_quantized` writes the
  quantised model (``quantization.json`` beside the usual model files); :func:`load_model` reads it back
  without building the float experts.

Example:
    >>> from moe_lab.models import MoEModel
    >>> m = OptimizedMoEModel(MoEModel.from_preset("tiny"))
    >>> cache = m.enable_dynamic_loading(cache_size=2, eviction_policy="lru", storage="host")
    >>> _ = m(torch.randint(0, 200, (1, 8)))
    >>> cache.get_stats().requests > 0
    True
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_lab.inference.expert_cache import ExpertCache, ExpertStore, experts_in_budget
from moe_lab.inference.expert_modules import CachedExperts, QuantizedExperts, SubsetExperts
from moe_lab.inference.trace import record_trace

__all__ = ["OptimizedMoEModel", "load_model", "load_quantized", "perplexity", "usage_profile"]

SELECTION_STRATEGIES = ("frequency_based", "random", "all")
QUANT_CONFIG_NAME = "quantization.json"
QUANT_FORMAT = "moe-lab-quantized"
QUANT_VERSION = 1


def _quantize_layers(model: Any, bits: int, group_size: int | None) -> None:
    """Replace every MoE layer's experts by :class:`QuantizedExperts` (works on the meta device too)."""
    layers = list(model.moe_layers())
    if not layers:
        raise ValueError("the model has no MoE layers")
    for layer in layers:
        if not hasattr(layer.experts, "w1_EDF"):
            raise ValueError("quantize() needs full expert weights (call it before other transformations)")
        layer.experts = QuantizedExperts(layer.experts, bits=bits, group_size=group_size)
        layer.impl = "loop"


def load_quantized(path: str | os.PathLike[str], device: str | torch.device | None = None) -> Any:
    """Load a model written by :meth:`OptimizedMoEModel.save_quantized`.

    The model is built on the meta device and the stored int8/int4 expert weights and scales are assigned
    as they are: the float experts never exist in memory.

    Example:
        >>> # model = load_quantized("runs/demo-int8")   # or load_model("runs/demo-int8")
    """
    import json

    from moe_lab.models import MoEModel
    from moe_lab.models.io import assign_state, load_model_dir

    d = Path(path)
    meta_file = d / QUANT_CONFIG_NAME
    if not meta_file.is_file():
        raise FileNotFoundError(f"{d}: no {QUANT_CONFIG_NAME} (not a quantised model directory)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_file}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != QUANT_FORMAT:
        raise ValueError(f'{meta_file}: expected an object with "format": "{QUANT_FORMAT}"')
    if meta.get("version") != QUANT_VERSION:
        raise ValueError(
            f"{meta_file}: version {meta.get('version')!r} is not supported (expected {QUANT_VERSION})"
        )
    bits, group_size = meta.get("bits"), meta.get("group_size")
    if bits not in (8, 4):
        raise ValueError(f"{meta_file}: bits must be 8 or 4, got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 2):
        raise ValueError(f"{meta_file}: group_size must be null or an integer >= 2, got {group_size!r}")
    cfg, state = load_model_dir(d)
    with torch.device("meta"):
        model = MoEModel(config=cfg)
        _quantize_layers(model, bits, group_size)
    assign_state(model, state, str(d))
    model.quantization = {
        "bits": bits,
        "group_size": group_size,
        "quantize_router": bool(meta.get("quantize_router", False)),
    }
    model.eval()
    return model.to(device) if device is not None else model


def load_model(path: str | os.PathLike[str], device: str | torch.device | None = None) -> Any:
    """Load a model from a moe-lab model dir, a quantised model dir (:meth:`OptimizedMoEModel.save_quantized`),
    a run dir (latest checkpoint) or a Hugging Face dir."""
    from moe_lab.models import MoEModel
    from moe_lab.models.io import WEIGHTS_NAME

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path not found: {p} (a model dir, a run dir or a Hugging Face dir)")
    if (p / QUANT_CONFIG_NAME).is_file():
        return load_quantized(p, device=device)
    if (p / WEIGHTS_NAME).is_file() and (
        (p / "config.yaml").is_file() or (p / "model_config.json").is_file()
    ):
        return MoEModel.load(str(p), device=device)
    if (p / "config.json").is_file():
        return MoEModel.from_pretrained(str(p)).to(device or "cpu")
    if (p / "checkpoints").is_dir() and (p / "config.yaml").is_file():
        from moe_lab.train.launch import load_run_model  # a run directory: the trainer knows its layout

        model, _, _, _ = load_run_model(p, device=str(device or "cpu"))
        return model
    raise FileNotFoundError(
        f"{p}: no model found (expected model.safetensors + config.yaml, config.json, or checkpoints/)"
    )


def usage_profile(model: Any, batches: Iterable[Tensor], max_tokens: int | None = None) -> Tensor:
    """``[L, E]`` expert usage counts of ``model`` over calibration ``batches`` (token ids ``[B, S]``)."""
    return record_trace(model, batches, max_tokens=max_tokens).expert_frequencies()


@torch.no_grad()
def perplexity(model: Any, batches: Iterable[Tensor]) -> float:
    """Token-weighted perplexity of ``model`` over ``batches`` of token ids ``[B, S]``."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        device = next(model.parameters()).device
        for batch in batches:
            batch = batch.to(device)
            out = model(batch, labels=batch)
            tokens = batch[:, 1:].numel()
            total += float(out.lm_loss) * tokens
            n += tokens
    finally:
        model.train(was)
    if n == 0:
        raise ValueError("no evaluation tokens")
    return math.exp(total / n)


class OptimizedMoEModel(nn.Module):
    """Wraps an MoE model for inference; call it like the model (``forward`` is the model's)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.cache: ExpertCache | None = None
        self.loaded_experts: dict[int, list[int]] | None = None
        self._hooks: list[Any] = []
        self._offload_dir: tempfile.TemporaryDirectory[str] | None = None

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        expert_selection_strategy: str = "all",
        num_experts_to_load: int | None = None,
        usage: Tensor | str | os.PathLike[str] | None = None,
        calibration_data: Iterable[Tensor] | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
    ) -> OptimizedMoEModel:
        """Load a model and optionally keep only ``num_experts_to_load`` experts per MoE layer.

        ``usage`` is a ``[L, E]`` tensor, a JSON file (``{"usage": [[...], ...]}``) of expert counts, e.g.
        from :func:`usage_profile` or ``RouterMonitor``, or a routing trace written by ``moe-lab trace``
        (``.safetensors``); without it, ``calibration_data`` is routed to record
        one. ``expert_selection_strategy``: ``"frequency_based"`` (most used), ``"random"`` (a baseline,
        seeded) or ``"all"``.
        """
        model = load_model(path, device=device)
        model.eval()
        opt = cls(model)
        if expert_selection_strategy not in SELECTION_STRATEGIES:
            raise ValueError(
                f"expert_selection_strategy must be one of {', '.join(SELECTION_STRATEGIES)}, "
                f"got {expert_selection_strategy!r}"
            )
        if expert_selection_strategy != "all":
            if num_experts_to_load is None:
                raise ValueError(
                    f"expert_selection_strategy={expert_selection_strategy!r} needs num_experts_to_load"
                )
            profile = None
            if expert_selection_strategy == "frequency_based":
                profile = opt._resolve_usage(usage, calibration_data)
            opt.select_experts(num_experts_to_load, profile=profile, seed=seed)
        return opt

    def _resolve_usage(self, usage: Any, calibration_data: Iterable[Tensor] | None) -> Tensor:
        if usage is None:
            if calibration_data is None:
                raise ValueError("frequency_based selection needs usage=[L, E] counts or calibration_data")
            return usage_profile(self.model, calibration_data)
        if isinstance(usage, (str, os.PathLike)):
            import json

            p = Path(usage)
            if not p.is_file():
                raise FileNotFoundError(f"usage profile not found: {p}")
            if p.suffix == ".safetensors":  # a routing trace (`moe-lab trace`): its expert counts
                from moe_lab.inference.trace import load_trace

                return load_trace(p).expert_frequencies()
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(
                    f'{p}: not a usage profile (JSON {{"usage": [[...], ...]}} or a routing trace '
                    f".safetensors): {err}"
                ) from None
            usage = torch.tensor(data["usage"] if isinstance(data, dict) else data, dtype=torch.float64)
        return torch.as_tensor(usage)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generation on the optimised model (see :func:`moe_lab.inference.generate.generate`)."""
        from moe_lab.inference.generate import generate

        return generate(self.model, *args, **kwargs)

    # ------------------------------------------------------------------------------------------------
    def _layers(self) -> list[Any]:
        layers = list(self.model.moe_layers())
        if not layers:
            raise ValueError("the model has no MoE layers")
        return layers

    @torch.no_grad()
    def select_experts(
        self, num_experts_to_load: int, *, profile: Tensor | None = None, seed: int = 0
    ) -> dict[int, list[int]]:
        """Keep ``num_experts_to_load`` experts per MoE layer (most used in ``profile``, else random)."""
        layers = self._layers()
        from moe_lab.nn.router import ExpertChoiceRouter

        if any(isinstance(layer.router, ExpertChoiceRouter) for layer in layers):
            raise ValueError(
                "selective expert loading needs token-choice routers (top_k, switch, sigmoid_bias): with "
                "expert_choice every expert picks its own tokens, so none can be left out"
            )
        e = int(layers[0].num_experts)
        k = int(getattr(layers[0].router, "top_k", 1))
        if not isinstance(num_experts_to_load, int) or not k <= num_experts_to_load <= e:
            raise ValueError(
                f"num_experts_to_load must be an int in [top_k={k}, num_experts={e}], got {num_experts_to_load!r}"
            )
        if profile is not None and tuple(profile.shape) != (len(layers), e):
            raise ValueError(
                f"usage profile must have shape [{len(layers)}, {e}], got {tuple(profile.shape)}"
            )
        gen = torch.Generator().manual_seed(seed)
        chosen: dict[int, list[int]] = {}
        for i, layer in enumerate(layers):
            if profile is not None:
                order = sorted(range(e), key=lambda j: (-float(profile[i, j]), j))
                keep = order[:num_experts_to_load]
            else:
                keep = torch.randperm(e, generator=gen)[:num_experts_to_load].tolist()
            mask = torch.full((e,), float("-inf"))
            mask[keep] = 0.0
            bias = layer.router.expert_bias
            bias.copy_((bias.cpu() + mask).to(bias.device))  # selection only: weights stay unbiased
            layer.experts = SubsetExperts(layer.experts, keep)
            layer.impl = "loop"
            chosen[i] = sorted(keep)
        self.loaded_experts = chosen
        return chosen

    def enable_dynamic_loading(
        self,
        cache_size: int | str,
        eviction_policy: str = "lru",
        *,
        scope: str = "per_layer",
        storage: str = "disk",
        offload_dir: str | os.PathLike[str] | None = None,
        prefetch: bool = False,
        profile: Tensor | None = None,
        device: str | torch.device | None = None,
    ) -> ExpertCache:
        """Move every expert to a slow tier and serve them through a bounded cache; returns the cache.

        ``storage``: ``"disk"`` (safetensors, memory-mapped; in ``offload_dir`` or a temporary directory) or
        ``"host"`` (host memory, pinned on CUDA). ``cache_size``: experts per layer kept on the device, or a
        byte budget as a string (``"24MB"``, ``"1.5GiB"``: per layer with ``scope="per_layer"``, in all with
        ``"global"``), turned into the number of experts it holds (every expert has the same size).

        Example:
            >>> from moe_lab.models import MoEModel
            >>> m = OptimizedMoEModel(MoEModel.from_preset("tiny"))
            >>> m.enable_dynamic_loading(cache_size="200KiB", storage="host").capacity  # 96 KiB per expert
            2
        """
        if storage not in ("disk", "host"):
            raise ValueError(f"storage must be 'disk' or 'host', got {storage!r}")
        if self.cache is not None:
            raise ValueError("dynamic loading is already enabled")
        layers = self._layers()
        if any(not hasattr(layer.experts, "w1_EDF") for layer in layers):
            raise ValueError("dynamic loading needs full expert weights (enable it before select/quantize)")
        dev = torch.device(device) if device is not None else next(self.model.parameters()).device
        weights: dict[int, dict[str, Tensor]] = {}
        for i, layer in enumerate(layers):
            ex = layer.experts
            weights[i] = {"w1": ex.w1_EDF.detach(), "w2": ex.w2_EFD.detach()}
            if getattr(ex, "w3_EDF", None) is not None:
                weights[i]["w3"] = ex.w3_EDF.detach()
        ExpertCache.check_arguments(cache_size, eviction_policy, scope, profile)  # before anything is written
        if isinstance(cache_size, str):  # a byte budget, checked before anything is written
            nbytes = sum(w[0].numel() * w.element_size() for w in weights[0].values())
            cache_size = experts_in_budget(cache_size, nbytes, len(layers), scope)
        if storage == "disk":
            if offload_dir is None:
                self._offload_dir = tempfile.TemporaryDirectory(prefix="moe-lab-experts-")
                offload_dir = self._offload_dir.name
            store = ExpertStore.to_disk(weights, offload_dir)
        else:
            store = ExpertStore.from_tensors(weights, pin_memory=dev.type == "cuda")
        cache = ExpertCache(
            store,
            cache_size,
            policy=eviction_policy,
            scope=scope,
            device=dev,
            profile=profile,
            prefetch=prefetch,
        )
        for i, layer in enumerate(layers):
            nxt = layers[i + 1].router if prefetch and i + 1 < len(layers) else None
            mod = CachedExperts(
                cache,
                i,
                int(layer.num_experts),
                layer.experts.activation,
                i + 1 if nxt is not None else None,
                nxt,
            )
            layer.experts = mod  # the full weights are released here
            layer.impl = "loop"
            self._hooks.append(layer.router.register_forward_hook(mod.observe_router))
        self.cache = cache
        return cache

    @torch.no_grad()
    def quantize(
        self, bits: int = 8, *, group_size: int | None = None, quantize_router: bool = False
    ) -> OptimizedMoEModel:
        """Weight-only quantisation of every MoE layer's experts (``bits`` 8 or 4).

        Routers stay in full precision by default (``quantize_router=False``): routing decisions are the
        most sensitive part. With ``quantize_router=True`` the router gate is rounded to int8 per expert row
        (stored dequantised), to measure that sensitivity.
        """
        _quantize_layers(self.model, bits, group_size)
        self.model.quantization = {
            "bits": bits,
            "group_size": group_size,  # as asked: None = int4's default, resolved per weight from its shape
            "quantize_router": quantize_router,
        }
        for layer in self._layers():
            if quantize_router:
                w = layer.router.gate.weight
                scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
                w.copy_(torch.round(w / scale).clamp(-127, 127) * scale)
        return self

    def save_quantized(
        self, directory: str | os.PathLike[str], *, extra_files: dict[str, str] | None = None
    ) -> Path:
        """Write the quantised model to ``directory`` atomically: ``config.yaml``, ``model.safetensors``
        (full-precision weights; each MoE layer's ``experts.w1_q`` / ``w1_scale`` ... as stored, int8 or
        packed int4) and ``quantization.json`` (bits, group size, whether the router was rounded), plus
        ``extra_files`` (name -> text, e.g. ``tokenizer.json``). :func:`load_model` / :func:`load_quantized`
        read it back.

        Example:
            >>> import tempfile
            >>> from moe_lab.models import MoEModel
            >>> opt = OptimizedMoEModel(MoEModel.from_preset("tiny")).quantize(bits=8)
            >>> path = opt.save_quantized(tempfile.mkdtemp() + "/tiny-int8")
            >>> type(load_model(path).moe_layers()[0].experts).__name__
            'QuantizedExperts'
        """
        import json

        from moe_lab.models.io import save_model_dir

        info = getattr(self.model, "quantization", None)
        layers = self._layers()
        if info is None or not all(isinstance(layer.experts, QuantizedExperts) for layer in layers):
            raise ValueError("save_quantized() needs a quantised model: call quantize(bits=...) first")
        meta = {"format": QUANT_FORMAT, "version": QUANT_VERSION, **info}
        files = {**(extra_files or {}), QUANT_CONFIG_NAME: json.dumps(meta, indent=2) + "\n"}
        return save_model_dir(self.model, Path(directory), extra_files=files)

    def expert_weight_bytes(self) -> int:
        """Bytes of expert weights held in device memory now (cache contents when offloading)."""
        if self.cache is not None:
            return self.cache.resident_bytes()
        total = 0
        for layer in self._layers():
            ex = layer.experts
            if isinstance(ex, QuantizedExperts):
                total += ex.weight_bytes()
            else:
                total += sum(p.numel() * p.element_size() for p in ex.parameters())
        return total

    def close(self) -> None:
        """Stop the prefetch thread and remove the temporary offload directory."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.cache is not None:
            self.cache.close()
        if self._offload_dir is not None:
            self._offload_dir.cleanup()
            self._offload_dir = None
