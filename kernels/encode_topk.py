"""Fused encoder -> ReLU -> TopK in Triton: only (n, k) values and indices reach memory.

Each program takes BLOCK_N rows and one split of the latents, and streams over latent tiles:
the tile's pre-activations (x - b_dec) @ W_enc[tile].T + b_enc accumulate in fp32 with
tl.dot, go through ReLU, are rounded to x's dtype (so order follows the values returned),
and become int64 keys: the value's float32 bits above the bit-flipped latent index. Integer
order on keys is the canonical order (values descending, ties to the lower index; zeros at
the lowest indices), so a running top-KP of keys per row is exact. Per tile: tl.topk of the
tile, then the bitonic merge max(best, flip(tile_top)) and a sort. With few rows, latents are
split across programs and the (n, splits, KP) partial lists merge in a small torch top-k.
With a dead-latent mask the same keys feed a second running top-k_aux (AuxK), live latents
counting as value 0, so AuxK costs no second GEMM. fused_forward is the triton backend's
encoder forward; its backward is the shared pair-sparse one (sae_fast.backends.pairs).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreting

# Kernels spell this mask as a literal: they can read no Python global, and the interpreter
# cannot take a global tl.constexpr in arithmetic.
_LOW32 = 0xFFFFFFFF


@triton.jit
def _encode_topk_kernel(
    X, W, B_ENC, B_DEC, KEYS, DEAD, AUX_KEYS,
    n, d, m, m_per_split,
    stride_xn, stride_xd, stride_wm, stride_wd, stride_kn, stride_ks, stride_an, stride_as,
    KP: tl.constexpr, KAP: tl.constexpr, HAS_AUX: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    lo = tl.program_id(1) * m_per_split
    hi = tl.minimum(lo + m_per_split, m)
    # Key 0 ranks below every real key (a zero value at index i has key 2^32 - 1 - i > 0).
    best = tl.zeros((BLOCK_N, KP), dtype=tl.int64)
    aux_best = tl.zeros((BLOCK_N, KAP), dtype=tl.int64)
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
        keys = (bits.to(tl.int64) << 32) | (0xFFFFFFFF - cols.to(tl.int64))[None, :]
        keys = tl.where(col_ok[None, :], keys, 0)
        top = tl.topk(keys, KP)
        best = tl.sort(tl.maximum(best, tl.flip(top, 1)), dim=1, descending=True)
        if HAS_AUX:  # AuxK: the same keys, live latents counting as value 0
            dead = tl.load(DEAD + cols, mask=col_ok, other=0)
            zero_keys = (0xFFFFFFFF - cols.to(tl.int64))[None, :]
            aux = tl.where(dead[None, :] != 0, keys, zero_keys)
            aux = tl.where(col_ok[None, :], aux, 0)
            aux_top = tl.topk(aux, KAP)
            aux_best = tl.sort(tl.maximum(aux_best, tl.flip(aux_top, 1)), dim=1, descending=True)
    split = tl.program_id(1)
    ks = tl.arange(0, KP)
    out = KEYS + rows[:, None] * stride_kn + split * stride_ks + ks[None, :]
    tl.store(out, best, mask=row_ok[:, None])
    if HAS_AUX:
        ks = tl.arange(0, KAP)
        out = AUX_KEYS + rows[:, None] * stride_an + split * stride_as + ks[None, :]
        tl.store(out, aux_best, mask=row_ok[:, None])


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
    args = {**named_args, **kwargs}
    kp = max(args["KP"], args["KAP"])
    fit = [
        c for c in configs
        if c.kwargs["BLOCK_M"] >= kp and c.kwargs["BLOCK_N"] * kp <= 8192
    ]  # fmt: skip
    return fit or [triton.Config({"BLOCK_N": 16, "BLOCK_M": max(kp, 64), "BLOCK_D": 32})]


_encode_topk_tuned = triton.autotune(
    configs=_configs(),
    key=["d", "m_per_split", "KP", "KAP", "IEEE"],
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


def topk_keys(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """Top-k keys per row in canonical order, and the AuxK keys when dead_mask is given.

    x: (n, d), n >= 1 -> (n, k) int64 and (n, k_aux) int64 or None.
    """
    n, d = x.shape
    m = W_enc.shape[0]
    kp = triton.next_power_of_2(k)
    has_aux = dead_mask is not None
    kap = triton.next_power_of_2(k_aux) if has_aux else 1
    splits = _splits(n, m, x.device)
    m_per_split = triton.cdiv(m, splits)
    keys = torch.empty(n, splits, kp, dtype=torch.int64, device=x.device)
    aux_keys = torch.empty(n, splits, kap, dtype=torch.int64, device=x.device) if has_aux else keys
    dead = dead_mask.to(torch.int8).contiguous() if has_aux else keys
    ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    args = (x, W_enc, b_enc.contiguous(), b_dec.contiguous(), keys, dead, aux_keys)
    args += (n, d, m, m_per_split, x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1))
    args += (keys.stride(0), keys.stride(1), aux_keys.stride(0), aux_keys.stride(1))
    meta = {"KP": kp, "KAP": kap, "HAS_AUX": has_aux, "IEEE": ieee}
    if interpreting():  # one small tile shape: the interpreter is ~1000x slower than a GPU
        grid = (triton.cdiv(n, 16), splits)
        tiles = {"BLOCK_N": 16, "BLOCK_M": max(32, kp, kap), "BLOCK_D": 16}
        _encode_topk_kernel[grid](*args, **meta, **tiles)
    else:

        def grid(tiles):
            return (triton.cdiv(n, tiles["BLOCK_N"]), splits)

        _encode_topk_tuned[grid](*args, **meta)
    return _merge(keys, k), (_merge(aux_keys, k_aux) if has_aux else None)


def _merge(keys: Tensor, k: int) -> Tensor:
    """(n, splits, kp) sorted partial lists -> the top k keys per row, sorted."""
    n, splits, kp = keys.shape
    keys = keys.view(n, splits * kp)
    return keys[:, :k] if splits == 1 else keys.topk(k, dim=1).values


def unkey(keys: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """int64 keys -> values in dtype (exact: they were rounded to it), int64 indices."""
    values = (keys >> 32).to(torch.int32).view(torch.float32).to(dtype)
    return values, _LOW32 - (keys & _LOW32)


def fused_forward(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size) -> tuple[Tensor, ...]:
    """(values, indices[, aux_values, aux_indices]) by the fused kernel: a backend's
    encoder_forward (chunk_size unused: tiles are autotuned here)."""
    if x.shape[0] == 0:
        outputs = ()
        for width in (k, k_aux) if dead_mask is not None else (k,):
            empty = torch.zeros(0, width, dtype=torch.int64, device=x.device)
            outputs += (x.new_zeros(0, width), empty)
        return outputs
    keys, aux_keys = topk_keys(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
    return unkey(keys, x.dtype) + (unkey(aux_keys, x.dtype) if aux_keys is not None else ())
