"""Fused encoder -> ReLU -> TopK in Triton: only (n, k) values and indices reach memory.

Each program takes BLOCK_N rows and one split of the latents, and streams over latent tiles:
the tile's pre-activations (x - b_dec) @ W_enc[tile].T + b_enc accumulate in fp32 with
tl.dot, go through ReLU, are rounded to x's dtype (so order follows the values returned),
and become int64 keys: the value's float32 bits above the bit-flipped latent index. Integer
order on keys is the canonical order (values descending, ties to the lower index; zeros at
the lowest indices), so a running top-KP of keys per row is exact. Per tile: tl.topk of the
tile, then the bitonic merge max(best, flip(tile_top)) and a sort. With few rows, latents are
split across programs and the (n, splits, KP) partial lists merge in a small torch top-k.
Backward: the shared pair-sparse encoder backward (sae_fast.torch_topk.encoder_backward).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from sae_fast.torch_topk import encoder_backward

from . import interpreting

_LOW32 = 0xFFFFFFFF


@triton.jit
def _encode_topk_kernel(
    X, W, B_ENC, B_DEC, KEYS,
    n, d, m, m_per_split,
    stride_xn, stride_xd, stride_wm, stride_wd, stride_kn, stride_ks,
    KP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    lo = tl.program_id(1) * m_per_split
    hi = tl.minimum(lo + m_per_split, m)
    # Key 0 ranks below every real key (a zero value at index i has key 2^32 - 1 - i > 0).
    best = tl.zeros((BLOCK_N, KP), dtype=tl.int64)
    for tile in range(lo, hi, BLOCK_M):
        cols = tile + tl.arange(0, BLOCK_M)
        col_ok = cols < hi
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < d
            x = tl.load(
                X + rows[:, None] * stride_xn + ds[None, :] * stride_xd,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            b_dec = tl.load(B_DEC + ds, mask=d_ok, other=0.0)
            w = tl.load(
                W + cols[:, None] * stride_wm + ds[None, :] * stride_wd,
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            xc = (x - b_dec[None, :]).to(W.dtype.element_ty)
            if IEEE:
                acc += tl.dot(xc, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(xc, tl.trans(w))
        b_enc = tl.load(B_ENC + cols, mask=col_ok, other=0.0).to(tl.float32)
        acts = tl.maximum(acc + b_enc[None, :], 0.0)
        acts = acts.to(X.dtype.element_ty).to(tl.float32)
        bits = acts.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # -0.0 sorts as 0.0
        keys = (bits.to(tl.int64) << 32) | (_LOW32 - cols.to(tl.int64))[None, :]
        keys = tl.where(col_ok[None, :], keys, 0)
        top = tl.topk(keys, KP)
        best = tl.sort(tl.maximum(best, tl.flip(top, 1)), dim=1, descending=True)
    ks = tl.arange(0, KP)
    tl.store(
        KEYS + rows[:, None] * stride_kn + tl.program_id(1) * stride_ks + ks[None, :],
        best,
        mask=row_ok[:, None],
    )


def _configs() -> list[triton.Config]:
    """Tiles for Hopper (H100/H200) and Ampere: 64-128 row blocks, 64-256 latent tiles."""
    out = []
    for bn, bm, bd, warps, stages in [
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 3),
        (64, 128, 64, 4, 4),
        (64, 256, 32, 8, 3),
        (64, 64, 64, 4, 4),
        (32, 256, 64, 8, 3),
        (16, 256, 64, 4, 3),
    ]:
        config = {"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_D": bd}
        out.append(triton.Config(config, num_warps=warps, num_stages=stages))
    return out


def _prune(configs, named_args, **kwargs):
    """tl.topk needs BLOCK_M >= KP; the running top-k of BLOCK_N x KP keys must fit registers."""
    kp = named_args["KP"] if "KP" in named_args else kwargs["KP"]
    fit = [
        c for c in configs
        if c.kwargs["BLOCK_M"] >= kp and c.kwargs["BLOCK_N"] * kp <= 8192
    ]  # fmt: skip
    return fit or [triton.Config({"BLOCK_N": 16, "BLOCK_M": max(kp, 64), "BLOCK_D": 32})]


_encode_topk_tuned = triton.autotune(
    configs=_configs(),
    key=["d", "m_per_split", "KP", "IEEE"],
    prune_configs_by={"early_config_prune": _prune},
)(_encode_topk_kernel)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _splits(n: int, m: int, device: torch.device) -> int:
    """Latent splits so that about one program per SM runs when rows alone are too few."""
    if device.type != "cuda":
        return 1 if m <= 64 else 2  # the interpreter: exercise the split merge on small shapes
    row_blocks = triton.cdiv(n, 64)
    return max(1, min(triton.cdiv(_sm_count(device.index or 0), row_blocks), triton.cdiv(m, 256)))


def topk_keys(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> Tensor:
    """Top-k keys per row, canonical order.  x: (n, d) -> (n, k) int64 (n >= 1)."""
    n, d = x.shape
    m = W_enc.shape[0]
    kp = triton.next_power_of_2(k)
    splits = _splits(n, m, x.device)
    m_per_split = triton.cdiv(m, splits)
    keys = torch.empty(n, splits, kp, dtype=torch.int64, device=x.device)
    ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    args = (x, W_enc, b_enc.contiguous(), b_dec.contiguous(), keys, n, d, m, m_per_split)
    args += (x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1))
    args += (keys.stride(0), keys.stride(1))
    if interpreting():  # one small tile shape: the interpreter is ~1000x slower than a GPU
        grid = (triton.cdiv(n, 16), splits)
        _encode_topk_kernel[grid](
            *args, KP=kp, IEEE=ieee, BLOCK_N=16, BLOCK_M=max(32, kp), BLOCK_D=16
        )
    else:

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), splits)

        _encode_topk_tuned[grid](*args, KP=kp, IEEE=ieee)
    keys = keys.view(n, splits * kp)
    return keys[:, :k] if splits == 1 else keys.topk(k, dim=1).values


def unkey(keys: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """int64 keys -> values in dtype (exact: they were rounded to it), int64 indices."""
    values = (keys >> 32).to(torch.int32).view(torch.float32).to(dtype)
    return values, _LOW32 - (keys & _LOW32)


class TritonEncodeTopK(torch.autograd.Function):
    """values, indices = TopK(ReLU((x - b_dec) @ W_enc.T + b_enc)), fused forward."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k):
        if x.shape[0] == 0:
            values = x.new_zeros(0, k)
            indices = torch.zeros(0, k, dtype=torch.int64, device=x.device)
        else:
            values, indices = unkey(topk_keys(x, W_enc, b_enc, b_dec, k), x.dtype)
        ctx.save_for_backward(x, W_enc, b_dec, values, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values, _grad_indices):
        grads = encoder_backward(ctx.needs_input_grad[:4], *ctx.saved_tensors, grad_values)
        return (*grads, None)


def encode_topk(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, chunk_size: int | None
) -> tuple[Tensor, Tensor]:
    """Fused TopK encoder (chunk_size is the torch backend's knob; tiles are autotuned here)."""
    return TritonEncodeTopK.apply(x, W_enc, b_enc, b_dec, k)
