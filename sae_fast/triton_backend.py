"""The ``triton`` backend: fused kernels from sae_fast.kernels, imported on first use.

Runs on CUDA tensors (the default there), and on CPU tensors only under TRITON_INTERPRET=1
when asked for by name (tests). Its backward is the shared pair-sparse one until the CUDA
extension provides its own.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

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


def encode_topk(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, chunk_size: int | None
) -> tuple[Tensor, Tensor]:
    from .kernels.encode_topk import encode_topk

    return encode_topk(x, W_enc, b_enc, b_dec, k, chunk_size)


def encode_topk_auxk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    dead_mask: Tensor,
    k_aux: int,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .kernels.encode_topk import encode_topk_auxk

    return encode_topk_auxk(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size)


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    from .kernels.decode import decode

    return decode(values, indices, W_dec, b_dec)


backends.register(
    backends.Backend(
        name="triton",
        priority=10,
        why_not=why_not,
        encode_topk=encode_topk,
        encode_topk_auxk=encode_topk_auxk,
        decode=decode,
        auto_device_types=("cuda",),
    )
)
