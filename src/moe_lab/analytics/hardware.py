"""Hardware profiles for throughput estimates: datasheet peaks for GPUs, a quick measurement for the CPU.

The GPU numbers are the vendor datasheet peaks for *dense* math (the headline "with sparsity" figures are
twice these); real runs reach a fraction of them (model FLOPs utilisation, MFU), which the estimates
take as a parameter.

Example:
    >>> from moe_lab.analytics.hardware import get_hardware_profile
    >>> get_hardware_profile("h100").peak_flops("bf16") / 1e12
    989.4
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

__all__ = ["DATASHEET", "HARDWARE_PROFILES", "HardwareProfile", "get_hardware_profile", "measure_cpu_profile"]


@dataclass(frozen=True)
class HardwareProfile:
    """Peak dense FLOP/s per dtype, memory bandwidth (bytes/s) and memory size (bytes) of one device."""

    name: str
    flops: dict[str, float]
    memory_bandwidth: float
    memory_bytes: float
    source: str
    measured: bool = False
    notes: str = field(default="", compare=False)

    def peak_flops(self, dtype: str = "bf16") -> float:
        """Peak dense FLOP/s for ``dtype`` (``fp32``, ``tf32``, ``bf16``, ``fp16``, ``fp8``)."""
        key = _dtype_key(dtype)
        if key in self.flops:
            return self.flops[key]
        if key in ("bf16", "fp16") and "fp32" in self.flops:
            return self.flops["fp32"]
        raise ValueError(
            f"hardware profile {self.name!r} has no peak for dtype {dtype!r}: {sorted(self.flops)}"
        )


def _dtype_key(dtype: str | torch.dtype) -> str:
    aliases = {
        "float32": "fp32",
        "torch.float32": "fp32",
        "fp32": "fp32",
        "tf32": "tf32",
        "bfloat16": "bf16",
        "torch.bfloat16": "bf16",
        "bf16": "bf16",
        "float16": "fp16",
        "torch.float16": "fp16",
        "fp16": "fp16",
        "half": "fp16",
        "fp8": "fp8",
    }
    key = aliases.get(str(dtype))
    if key is None:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(set(aliases.values()))}")
    return key


# Datasheet peaks (dense, no sparsity). name: (flops by dtype, bandwidth B/s, memory bytes, source)
DATASHEET: dict[str, tuple[dict[str, float], float, float, str]] = {
    "a100": (
        {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
        2.039e12,
        80e9,
        "NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM: 312 TFLOPS BF16 dense, 2,039 GB/s HBM2e)",
    ),
    "h100": (
        {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12},
        3.35e12,
        80e9,
        "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: 1,979 TFLOPS BF16 with sparsity = 989.4 dense, "
        "3.35 TB/s HBM3)",
    ),
    "h200": (
        {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12},
        4.8e12,
        141e9,
        "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM: 1,979 TFLOPS BF16 with sparsity = 989.4 dense, "
        "4.8 TB/s HBM3e, 141 GB)",
    ),
}

HARDWARE_PROFILES: dict[str, HardwareProfile] = {
    name: HardwareProfile(name=name, flops=dict(f), memory_bandwidth=bw, memory_bytes=mem, source=src)
    for name, (f, bw, mem, src) in DATASHEET.items()
}


def _best_time(fn: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu_profile(size: int = 512, repeats: int = 5) -> HardwareProfile:
    """Measure this CPU on the spot: fp32 (and bf16) matmul FLOP/s and copy bandwidth (well under a second).

    Uses the current ``torch.get_num_threads()``. The result is a lower bound of the real peak.
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    t = _best_time(lambda: a @ b, repeats)
    flops = {"fp32": 2 * size**3 / t}
    try:
        a16, b16 = a.bfloat16(), b.bfloat16()
        a16 @ b16
        flops["bf16"] = 2 * size**3 / _best_time(lambda: a16 @ b16, repeats)
    except RuntimeError:  # pragma: no cover - bf16 matmul missing on this build
        pass
    src = torch.empty(8 * 1024 * 1024 // 4)  # 8 MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    t_copy = _best_time(lambda: dst.copy_(src), repeats)
    bandwidth = 2 * src.numel() * 4 / t_copy  # read + write
    try:
        mem = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        mem = 0.0
    return HardwareProfile(
        name="cpu",
        flops=flops,
        memory_bandwidth=bandwidth,
        memory_bytes=mem,
        source=f"measured: {size}x{size} matmul and 8 MiB copy, {torch.get_num_threads()} threads",
        measured=True,
    )


def get_hardware_profile(name: str | HardwareProfile) -> HardwareProfile:
    """A profile by name (``cpu`` measures now; ``a100``, ``h100``, ``h200`` from the datasheet table)."""
    if isinstance(name, HardwareProfile):
        return name
    key = name.lower().replace("-", "").replace(" ", "")
    if key == "cpu":
        return measure_cpu_profile()
    if key not in HARDWARE_PROFILES:
        raise ValueError(f"unknown hardware {name!r}; expected one of {['cpu', *HARDWARE_PROFILES]}")
    return HARDWARE_PROFILES[key]
