"""Sparse decoder in Triton: x_hat[t] = sum_j values[t, j] * W_dec[indices[t, j]] + b_dec.

Forward: one program per (row, d tile) gathers the row's k decoder rows, accumulating in fp32.
Backward: grad values[t, j] = W_dec[indices[t, j]] . grad_x_hat[t] (one program per (row,
k tile), a loop over d); grad W_dec, a scatter into the rows used, comes from the torch
backend's sparse gather-sum backward; grad b_dec is the column sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from sae_fast.torch_decode import scatter_rows

from . import interpreting


@triton.jit
def _decode_kernel(
    V, IDX, W, B, OUT, k, d,
    stride_vn, stride_in, stride_wm, stride_on,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < d
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j0 in range(0, k, BLOCK_K):
        js = j0 + tl.arange(0, BLOCK_K)
        j_ok = js < k
        v = tl.load(V + row * stride_vn + js, mask=j_ok, other=0.0).to(tl.float32)
        idx = tl.load(IDX + row * stride_in + js, mask=j_ok, other=0)
        mask = j_ok[:, None] & d_ok[None, :]
        w = tl.load(W + idx[:, None] * stride_wm + ds[None, :], mask=mask, other=0.0)
        acc += tl.sum(v[:, None] * w.to(tl.float32), axis=0)
    acc += tl.load(B + ds, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_on + ds, acc.to(OUT.dtype.element_ty), mask=d_ok)


@triton.jit
def _grad_values_kernel(
    G, IDX, W, OUT, k, d,
    stride_gn, stride_in, stride_wm, stride_on,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    js = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = js < k
    idx = tl.load(IDX + row * stride_in + js, mask=j_ok, other=0)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d
        g = tl.load(G + row * stride_gn + ds, mask=d_ok, other=0.0).to(tl.float32)
        mask = j_ok[:, None] & d_ok[None, :]
        w = tl.load(W + idx[:, None] * stride_wm + ds[None, :], mask=mask, other=0.0)
        acc += tl.sum(w.to(tl.float32) * g[None, :], axis=1)
    tl.store(OUT + row * stride_on + js, acc.to(OUT.dtype.element_ty), mask=j_ok)


def _blocks(k: int, d: int) -> tuple[int, int]:
    if interpreting():
        return min(triton.next_power_of_2(k), 8), 16
    return min(triton.next_power_of_2(k), 32), 128


def decode_forward(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """(n, k), (n, k), (m, d), (d,) -> x_hat (n, d) in W_dec's dtype; rows of W_dec contiguous."""
    n, k = values.shape
    d = W_dec.shape[1]
    out = torch.empty(n, d, dtype=W_dec.dtype, device=W_dec.device)
    if n:
        block_k, block_d = _blocks(k, d)
        _decode_kernel[(n, triton.cdiv(d, block_d))](
            values, indices, W_dec, b_dec, out, k, d,
            values.stride(0), indices.stride(0), W_dec.stride(0), out.stride(0),
            BLOCK_K=block_k, BLOCK_D=block_d,
        )  # fmt: skip
    return out


def grad_values(grad_x_hat: Tensor, indices: Tensor, W_dec: Tensor, dtype: torch.dtype) -> Tensor:
    """out[t, j] = W_dec[indices[t, j]] . grad_x_hat[t].  -> (n, k) in dtype."""
    n, k = indices.shape
    d = W_dec.shape[1]
    out = torch.empty(n, k, dtype=dtype, device=W_dec.device)
    if n:
        block_k, block_d = _blocks(k, d)
        _grad_values_kernel[(n, triton.cdiv(k, block_k))](
            grad_x_hat, indices, W_dec, out, k, d,
            grad_x_hat.stride(0), indices.stride(0), W_dec.stride(0), out.stride(0),
            BLOCK_K=block_k, BLOCK_D=block_d,
        )  # fmt: skip
    return out


class TritonDecode(torch.autograd.Function):
    """x_hat (n, d) from values (n, k), indices (n, k), W_dec (m, d), b_dec (d,)."""

    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec):
        values, indices = values.contiguous(), indices.contiguous()
        W_dec, b_dec = W_dec.contiguous(), b_dec.contiguous()
        ctx.save_for_backward(values, indices, W_dec)
        return decode_forward(values, indices, W_dec, b_dec)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x_hat):
        values, indices, W_dec = ctx.saved_tensors
        grad_x_hat = grad_x_hat.contiguous()
        grad_v = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_v = grad_values(grad_x_hat, indices, W_dec, values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = scatter_rows(indices, values, grad_x_hat, W_dec)
        if ctx.needs_input_grad[3]:
            grad_b = grad_x_hat.sum(dim=0)
        return grad_v, None, grad_W, grad_b


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Differentiable sparse decode.  (n, k), (n, k) -> (n, d)."""
    return TritonDecode.apply(values, indices, W_dec, b_dec)
