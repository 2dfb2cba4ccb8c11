"""The ``triton`` backend: the fused kernels of sae_fast.kernels, imported on first use.

Runs on CUDA tensors (picked automatically there) in float32, float16 and bfloat16, and on CPU
tensors only under TRITON_INTERPRET=1 when asked for by name (tests). Its encoder backward is
the shared pair-sparse one until the CUDA extension provides its own.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

from ..kernels import interpreting
from .registry import Backend, register

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as e:  # a broken install is a reason, not a crash
        return f"triton does not import: {type(e).__name__}: {e}"
    return None


def requirement(device: torch.device) -> str | None:
    """None if triton imports and can run kernels for device, else why not."""
    if device.type != "cuda" and not interpreting():
        return "Triton kernels run on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    return _import_error()


def encoder_forward(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size) -> tuple[Tensor, ...]:
    """The fused encoder (kernels.encode_topk.fused_forward; triton loads on the first call)."""
    from ..kernels.encode_topk import fused_forward

    return fused_forward(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size)


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """The sparse decode kernel with its backward (kernels.decode)."""
    from ..kernels.decode import decode as triton_decode

    return triton_decode(values, indices, W_dec, b_dec)


register(
    Backend(
        name="triton",
        priority=10,
        encoder_forward=encoder_forward,
        decode=decode,
        device_types=("cuda", "cpu"),
        dtypes=DTYPES,
        auto_device_types=("cuda",),
        requirement=requirement,
    )
)
