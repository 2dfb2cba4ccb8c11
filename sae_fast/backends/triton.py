"""The ``triton`` backend: the fused kernels of sae_fast.kernels, imported on first use.

Runs on CUDA tensors (picked automatically there) in float32, float16 and bfloat16, and on CPU
tensors only under TRITON_INTERPRET=1 when asked for by name (tests). The encoder's TopK code
comes from the fused kernel or the chunked backend's encoder, whichever encoders.choose
measured faster for the device and shape (SAE_FAST_ENCODER overrides); its AuxK code from
the dead latents alone (pairs.dead_code, on the torch backend's encoder); its backward is
the shared pair-sparse one. A kernel that cannot be built for the device falls back to the
torch computation with one warning.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

from ..kernels import interpreting
from . import encoders
from .pairs import dead_code
from .registry import Backend, get, register

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


@functools.cache
def _fallback(what: str):
    from ..kernels.fallback import Fallback

    return Fallback(what)


def or_torch(what: str, key, kernel, x, W_enc, b_enc, b_dec, k, chunk_size) -> tuple[Tensor, ...]:
    """kernel(), a Triton encoder's TopK code, or the torch backend's once the `what` kernel
    could not be built for key (one warning per key)."""
    torch_forward = get("torch").encoder_forward
    return _fallback(what)(
        key, kernel, lambda: torch_forward(x, W_enc, b_enc, b_dec, k, None, 0, chunk_size)
    )


def encoder_forward(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size) -> tuple[Tensor, ...]:
    """The TopK code by the faster exact encoder (encoders.choose: on a GPU by measurement, on
    CPU the fused one unless SAE_FAST_ENCODER says otherwise), and the AuxK code."""
    from ..kernels.encode_topk import cliff, topk_code

    def fused() -> tuple[Tensor, ...]:
        key = (x.dtype, x.shape[1], W_enc.shape[0], k)
        kernel = functools.partial(topk_code, x, W_enc, b_enc, b_dec, k)
        return or_torch("encoder", key, kernel, x, W_enc, b_enc, b_dec, k, chunk_size)

    paths = {
        "fused": fused,
        "chunked": lambda: get("chunked").encoder_forward(
            x, W_enc, b_enc, b_dec, k, None, 0, chunk_size
        ),
    }
    if x.is_cuda and x.shape[0]:
        capability = torch.cuda.get_device_capability(x.device)
        reason = cliff(capability, x.dtype, x.shape[1], k)
        ruled_out = {"fused": reason} if reason else {}
        code = paths[encoders.choose(encoders.key(x, W_enc, k), paths, ruled_out=ruled_out)]()
    else:
        code = paths[encoders.overridden() or "fused"]()
    if dead_mask is None:
        return code
    torch_forward = get("torch").encoder_forward
    return code + dead_code(x, W_enc, b_enc, b_dec, dead_mask, k_aux, torch_forward, chunk_size)


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """The sparse decode kernels with their backward (kernels.decode)."""
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
