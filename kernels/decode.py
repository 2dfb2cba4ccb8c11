"""Sparse decoder in Triton: x_hat[t] = sum_j values[t, j] * W_dec[indices[t, j]] + b_dec.

The pair-sparse helpers of sae_fast.backends.pairs, as kernels, same names and arguments:
gather_sum (one program per (row, d tile) gathers the row's k decoder rows, accumulating in
fp32, then the bias) and pair_dot (grad values[t, j] = W_dec[indices[t, j]] . grad_x_hat[t]:
one program per (row, k tile), a loop over d). decode is the shared scaffold's decoder
Function over them, with the shared scatter_sum for grad W_dec (a scatter into the rows used).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sae_fast.backends import pairs
from sae_fast.kernels import interpreting
from sae_fast.kernels.fallback import Fallback
from sae_fast.kernels.launch import Launch


@triton.jit
def _gathered_rows(W, idx, stride_wm, ds, j_ok, d_ok):
    """The tile W[idx, ds] (BLOCK_K, BLOCK_D) in fp32, zero where masked."""
    mask = j_ok[:, None] & d_ok[None, :]
    return tl.load(W + idx[:, None] * stride_wm + ds[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def gather_sum_kernel(
    W, V, IDX, B, OUT, k, d, stride_wm, stride_vn, stride_in, stride_on,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program per (row, d tile); the bias is added last, in fp32.
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < d
    row = tl.program_id(0).to(tl.int64)  # int64: n * d may pass 2^31
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j0 in range(0, k, BLOCK_K):
        js = j0 + tl.arange(0, BLOCK_K)
        j_ok = js < k
        v = tl.load(V + row * stride_vn + js, mask=j_ok, other=0.0).to(tl.float32)
        idx = tl.load(IDX + row * stride_in + js, mask=j_ok, other=0)
        acc += tl.sum(v[:, None] * _gathered_rows(W, idx, stride_wm, ds, j_ok, d_ok), axis=0)
    acc += tl.load(B + ds, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_on + ds, acc.to(OUT.dtype.element_ty), mask=d_ok)


@triton.jit
def pair_dot_kernel(
    W, G, IDX, OUT, k, d, stride_wm, stride_gn, stride_in, stride_on,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program per (row, k tile), a loop over d.
    row = tl.program_id(0).to(tl.int64)  # int64: n * d may pass 2^31
    js = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = js < k
    idx = tl.load(IDX + row * stride_in + js, mask=j_ok, other=0)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d
        g = tl.load(G + row * stride_gn + ds, mask=d_ok, other=0.0).to(tl.float32)
        acc += tl.sum(_gathered_rows(W, idx, stride_wm, ds, j_ok, d_ok) * g[None, :], axis=1)
    tl.store(OUT + row * stride_on + js, acc, mask=j_ok)


def _blocks(k: int) -> tuple[int, int]:
    if interpreting():
        return min(triton.next_power_of_2(k), 8), 16
    return min(triton.next_power_of_2(k), 32), 128


def plan(kernel, out: Tensor, tiles_over_k: bool, W: Tensor, *args: Tensor) -> Launch:
    """The launch of a kernel of this file on contiguous operands (W, per-row values,
    indices[, bias]): one program per (row of out, tile of its k or d columns)."""
    W, rows, indices, *bias = (t.contiguous() for t in (W, *args))
    n, k = indices.shape
    d = W.shape[1]
    block_k, block_d = _blocks(k)
    grid = (n, triton.cdiv(k, block_k) if tiles_over_k else triton.cdiv(d, block_d))
    args = (W, rows, indices, *bias, out, k, d, W.stride(0), rows.stride(0), indices.stride(0))
    return Launch(kernel, grid, (*args, out.stride(0)), {"BLOCK_K": block_k, "BLOCK_D": block_d})


def _launch(kernel, out: Tensor, tiles_over_k: bool, W: Tensor, *args: Tensor) -> Tensor:
    if out.shape[0]:
        plan(kernel, out, tiles_over_k, W, *args).run()
    return out


_fallback = Fallback("decoder")


def _key(W: Tensor, indices: Tensor) -> tuple:
    return (W.dtype, W.shape[1], indices.shape[1])


def gather_sum(W: Tensor, coeff: Tensor, indices: Tensor, bias: Tensor) -> Tensor:
    """out[t] = sum_j coeff[t, j] * W[indices[t, j]] + bias, in fp32 until the one rounding.

    W (m, d); coeff, indices (n, k); bias (d,) -> (n, d) in W's dtype.
    """
    out = torch.empty(indices.shape[0], W.shape[1], dtype=W.dtype, device=W.device)
    return _fallback(
        ("gather_sum", *_key(W, indices)),
        lambda: _launch(gather_sum_kernel, out, False, W, coeff, indices, bias),
        lambda: pairs.gather_sum(W, coeff.to(W.dtype), indices, bias),
    )


def pair_dot(W: Tensor, g: Tensor, indices: Tensor) -> Tensor:
    """out[t, j] = W[indices[t, j]] . g[t] in fp32.  (m, d), (n, d), (n, k) -> (n, k)."""
    out = torch.empty(indices.shape, dtype=torch.float32, device=W.device)
    return _fallback(
        ("pair_dot", *_key(W, indices)),
        lambda: _launch(pair_dot_kernel, out, True, W, g, indices),
        lambda: pairs.pair_dot(W, g, indices),
    )


# The sparse decoder: x_hat (n, d) from values (n, k), indices (n, k), W_dec (m, d), b_dec (d,).
decode = pairs.decode_function("TritonDecode", gather_sum, pairs.scatter_sum, pair_dot).apply
