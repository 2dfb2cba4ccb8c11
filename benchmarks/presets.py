"""Benchmark shapes: named presets and custom shapes from flags."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Preset:
    """n tokens, d input width, m latents, k active; m_sweep: latent counts to probe for OOM."""

    name: str
    n: int
    d: int
    m: int
    k: int
    dtype: str
    device: str
    m_sweep: tuple[int, ...] = ()

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


PRESETS = {
    "cpu": Preset("cpu", 2048, 768, 24576, 32, "fp32", "cpu"),
    "gpu": Preset("gpu", 8192, 2304, 65536, 64, "bf16", "cuda"),
    "gpu-large": Preset(
        "gpu-large", 16384, 768, 1 << 20, 64, "bf16", "cuda", tuple(1 << p for p in range(15, 21))
    ),
    # A few seconds end to end on a CPU: CI runs it to keep the suite working.
    "smoke": Preset("smoke", 64, 32, 256, 4, "fp32", "cpu"),
}


def resolve(
    name: str,
    *,
    n: int | None = None,
    d: int | None = None,
    m: int | None = None,
    k: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    m_sweep: tuple[int, ...] | None = None,
) -> Preset:
    """The named preset with any of its fields overridden; raises ValueError on a bad shape."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    changes = {"n": n, "d": d, "m": m, "k": k, "dtype": dtype, "device": device}
    changes = {key: v for key, v in changes.items() if v is not None}
    preset = replace(PRESETS[name], **changes)
    if m_sweep is not None:
        preset = replace(preset, m_sweep=m_sweep)
    if preset.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {preset.dtype!r}")
    for field in ("n", "d", "m", "k"):
        if getattr(preset, field) < 1:
            raise ValueError(f"{field} must be >= 1, got {getattr(preset, field)}")
    if preset.k > min((preset.m, *preset.m_sweep)):
        raise ValueError(f"k={preset.k} must not exceed the number of latents")
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"preset {preset.name!r} runs on CUDA, and no CUDA device is available")
    return preset
