"""Argument checks and the dtype names every layer shares: each error names the argument."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .options import is_int


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32", as configs store it."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: object) -> torch.dtype | None:
    """The floating torch dtype a config names ("float32", "torch.bfloat16", ...), else None."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def check_int(
    value: object, name: str, *, minimum: int | None = 1, error: type[Exception] = ValueError
) -> int:
    """value if it is an int >= minimum (None: any int); else `error` naming it."""
    if not is_int(value, minimum):
        kind = {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(
            minimum, f"an int >= {minimum}"
        )
        raise error(f"{name} must be {kind}, got {value!r}")
    return value


def check_chunk_size(chunk_size: int | None) -> None:
    """chunk_size: None or latents per encoder chunk, >= 1."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")


def _tensor(name: str, t: object, rank: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(t.shape)}")
    return t


def _floating(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _same_dtype_device(ref_name: str, ref: Tensor, **others: Tensor) -> None:
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"dtype mismatch: {ref_name} has {ref.dtype}, {name} has {t.dtype}")
        if t.device != ref.device:
            raise ValueError(
                f"device mismatch: {ref_name} is on {ref.device}, {name} is on {t.device}"
            )


def _vector(name: str, t: object, size: int, size_name: str) -> None:
    _tensor(name, t, 1)
    if t.shape[0] != size:
        raise ValueError(
            f"{name} must have shape ({size},) to match {size_name}, got {tuple(t.shape)}"
        )


def check_k(k: object, n_latents: int, name: str = "k") -> int:
    """k must be an int with 1 <= k <= n_latents."""
    check_int(k, name, minimum=None, error=TypeError)
    if not 1 <= k <= n_latents:
        raise ValueError(f"{name} must satisfy 1 <= {name} <= n_latents={n_latents}, got {k}")
    return k


def check_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> None:
    """x (n, d), W_enc (m, d), b_enc (m,), b_dec (d,), 1 <= k <= m; one dtype and device."""
    _tensor("x", x, 2)
    _floating("x", x)
    _tensor("W_enc", W_enc, 2)
    m, d = W_enc.shape
    if x.shape[1] != d:
        raise ValueError(
            f"x has d={x.shape[1]} features but W_enc has shape {tuple(W_enc.shape)} (m, d)"
        )
    _vector("b_enc", b_enc, m, "W_enc's m")
    _vector("b_dec", b_dec, d, "W_enc's d")
    _same_dtype_device("x", x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec)
    check_k(k, m)


def check_dead_mask(dead_mask: Tensor, W_enc: Tensor, k_aux: int) -> None:
    """dead_mask (m,) bool on W_enc's device; 1 <= k_aux <= m."""
    m = W_enc.shape[0]
    _vector("dead_mask", dead_mask, m, "W_enc's m")
    if dead_mask.dtype != torch.bool:
        raise TypeError(f"dead_mask must be a bool tensor, got {dead_mask.dtype}")
    if dead_mask.device != W_enc.device:
        raise ValueError(
            f"device mismatch: W_enc is on {W_enc.device}, dead_mask is on {dead_mask.device}"
        )
    check_k(k_aux, m, name="k_aux")


def check_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> None:
    """values (n, k) float, indices (n, k) integer in [0, m), W_dec (m, d), b_dec (d,)."""
    _tensor("values", values, 2)
    _floating("values", values)
    _tensor("indices", indices, 2)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    if indices.shape != values.shape:
        raise ValueError(
            f"indices shape {tuple(indices.shape)} must equal values shape {tuple(values.shape)}"
        )
    _tensor("W_dec", W_dec, 2)
    m, d = W_dec.shape
    _vector("b_dec", b_dec, d, "W_dec's d")
    _same_dtype_device("values", values, W_dec=W_dec, b_dec=b_dec)
    if indices.device != values.device:
        raise ValueError(
            f"device mismatch: values is on {values.device} but indices is on {indices.device}"
        )
    if indices.numel() and not (int(indices.min()) >= 0 and int(indices.max()) < m):
        raise ValueError(f"indices must lie in [0, {m}) (W_dec has m={m} rows)")


def check_activations(x: object, d_in: int, like: Tensor, name: str = "x") -> Tensor:
    """x (..., d_in), floating, on like's dtype and device (the module's parameters)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"{name} must have shape (..., d_in={d_in}), got {tuple(x.shape)}")
    _floating(name, x)
    _same_dtype_device(name, x, **{"the SAE's parameters": like})
    return x


def device_memory(device: torch.device) -> int:
    """Bytes of memory on device: the GPU's total, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(nbytes: int, what: str, device: torch.device, error: type[Exception]) -> None:
    """Raise error when nbytes (what, e.g. "n_latents=... x d_in=...") exceeds device memory,
    before an allocation that would fail with a raw RuntimeError or exhaust the machine."""
    total = device_memory(device)
    if nbytes > total:
        raise error(
            f"{what} needs {nbytes / 2**30:,.1f} GiB, more than the {total / 2**30:,.1f} GiB "
            f"of {device}"
        )
