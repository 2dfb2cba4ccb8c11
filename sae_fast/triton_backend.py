"""The ``triton`` backend: fused kernels from sae_fast.kernels, imported on first use.

Runs on CUDA tensors (the default there), and on CPU tensors only under TRITON_INTERPRET=1
when asked for by name (tests). Its backward is the shared pair-sparse one until the CUDA
extension provides its own.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch

from . import backends


@functools.cache
def _import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as e:  # a broken install is a reason, not a crash
        return f"triton does not import: {type(e).__name__}: {e}"
    return None


def why_not(device: torch.device) -> str | None:
    """None if the Triton kernels can run on device, else why not."""
    from .kernels import interpreting

    if device.type != "cuda" and not interpreting():
        return "Triton kernels run on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    return _import_error()


def _kernel(module: str, name: str) -> Callable:
    """sae_fast.kernels.<module>.<name>, imported on the first call (triton loads then)."""

    def call(*args):
        return getattr(importlib.import_module(f"sae_fast.kernels.{module}"), name)(*args)

    return call


backends.register(
    backends.Backend(
        name="triton",
        priority=10,
        why_not=why_not,
        encode_topk=_kernel("encode_topk", "encode_topk"),
        encode_topk_auxk=_kernel("encode_topk", "encode_topk_auxk"),
        decode=_kernel("decode", "decode"),
        auto_device_types=("cuda",),
    )
)
