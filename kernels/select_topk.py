"""Running ReLU -> TopK over blocks of pre-activations, in Triton: the select of the chunked
encoder, whose GEMM is the vendor's (cuBLAS through torch.addmm).

Each row keeps its best KP keys, sorted descending, in a (n, KP) int64 tensor that every call
updates in place; its k-th key is the row's threshold. A call takes the pre-activations
(n, c) of latents start .. start + c - 1 and streams over them in tiles: a tile's values go
through ReLU (NaN propagates) and become keys as in the fused encoder (encode_topk.py): the
value's own bits above the bit-flipped latent index, so integer order is the canonical order
(values descending, ties to the lower index, zeros at the lowest indices) and key 0 is
"none". A key counts only if it beats its row's threshold: most tiles, once the threshold is
high, cost one load and one compare per element. A tile where some row has a candidate joins
the running best by its top KP and one bitonic merge. Chunks arrive in latent order, so a key
that ties the threshold's value has a higher index and rightly loses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sae_fast.kernels import interpreting
from sae_fast.kernels.encode_topk import ascending, keys_of, merge_candidates, unkey
from sae_fast.kernels.launch import Launch


@triton.jit
def select_topk_kernel(
    PRE, BEST, n, c, start, stride_pn, stride_bn,
    K: tl.constexpr, KP: tl.constexpr, VALUE16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    ks = tl.arange(0, KP)
    best_at = BEST + rows.to(tl.int64)[:, None] * stride_bn + ks[None, :]
    best = tl.load(best_at, mask=row_ok[:, None], other=0)
    theta = tl.max(tl.where(ks[None, :] == K - 1, best, 0), 1)
    pre_rows = PRE + rows.to(tl.int64)[:, None] * stride_pn  # int64: n * c may pass 2^31
    for tile in range(0, c, BLOCK_M):
        cols = tile + tl.arange(0, BLOCK_M)
        ok = row_ok[:, None] & (cols < c)[None, :]
        pre = tl.load(pre_rows + cols[None, :], mask=ok, other=0.0)
        acts = tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL).to(PRE.dtype.element_ty)
        keys = keys_of(acts, start + cols, VALUE16)
        beats = (keys > theta[:, None]) & ok
        gains = tl.max(tl.sum(beats.to(tl.int32), 1), 0) > 0  # some row has a candidate
        # A loop of 0 or 1 trips, not an if: Triton's layout pass keeps loop-carried values in
        # one layout, where an if that yields a merged best may not compile (encode_topk.py).
        # Its only trip is trip = 0, the "none" key: the tile's top KP reads it so that it
        # stays in the loop (loop-invariant code motion would run it on every tile).
        for trip in range(gains.to(tl.int32)):
            up = ascending(tl.topk(tl.where(beats, keys, trip), KP), KP, KP)
            best, theta = merge_candidates(best, up, K, KP)
    tl.store(best_at, best, mask=row_ok[:, None])


# Rows a program takes, latents a tile and warps; the interpreter is ~1000x slower than a GPU.
BLOCK_N, BLOCK_M, WARPS = 32, 128, 8
_INTERPRETED = (16, 32)
# Keys of the running best one program holds (BLOCK_N * KP): 4096 spilled at fp32 k = 256
# on sm_90 once the merge stayed behind its branch; 2048 compiles to 80 registers at any k.
RUNNING_KEYS = 2048


def running(n: int, k: int, device: torch.device) -> Tensor:
    """The running best of n rows before any latent: (n, KP) keys, all "none"."""
    return torch.zeros(n, triton.next_power_of_2(k), dtype=torch.int64, device=device)


def plan(pre: Tensor, first: int, best: Tensor, k: int) -> Launch:
    """The launch that merges relu(pre) (n, c), latents first .. first + c - 1 with unit
    stride, into best (n, KP) in place."""
    n, c = pre.shape
    kp = best.shape[1]
    block_n, block_m = _INTERPRETED if interpreting() else (BLOCK_N, BLOCK_M)
    block_m = max(block_m, kp)  # tl.topk takes KP of a tile at least that wide
    block_n = min(block_n, max(1, RUNNING_KEYS // kp))  # the running best in registers
    meta = {"K": k, "KP": kp, "VALUE16": pre.dtype != torch.float32}
    meta |= {"BLOCK_N": block_n, "BLOCK_M": block_m}
    if not interpreting():
        meta["num_warps"] = WARPS
    args = (pre, best, n, c, first, pre.stride(0), best.stride(0))
    return Launch(select_topk_kernel, (triton.cdiv(n, block_n),), args, meta)


def select(pre: Tensor, first: int, best: Tensor, k: int) -> None:
    """Merge relu(pre) (n, c) of latents first .. first + c - 1 into best (n, KP) in place."""
    if pre.shape[0] and pre.shape[1]:
        plan(pre, first, best, k).run()


def finish(best: Tensor, k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The code of the running best: values (n, k) in dtype and int64 indices, canonical."""
    return unkey(best[:, :k].contiguous(), dtype)
