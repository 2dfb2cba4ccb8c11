"""One pass of Adam over a parameter's rows, with the decoder's projection and renormalisation.

A TopK SAE's optimizer step (Gao et al. 2024) is, for W_dec: drop from each row's gradient
its component along the row, take an Adam step, rescale the row to unit norm. Done as
separate torch ops this reads and writes the (m, d) tensors about 16 times (the projection's
row dot products, its update of the gradient, Adam's 7, the norm and the division); here one
program per row reads the gradient, the row and the two moments once and writes the row and
the moments once, 7 passes in all, the minimum for Adam. The row's own re-reads (the dot
product before the update, the rescale after it) hit the cache: a row is a few KiB.

The arithmetic is torch's fused Adam, in fp32 whatever the storage dtype:
    m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
    p -= (lr / (1 - beta1^t)) * (m / (sqrt(v) / sqrt(1 - beta2^t) + eps))
and the moments are stored in their own tensors' dtype (fp32, or bf16 to halve their bytes).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl
from torch import Tensor

from sae_fast.kernels import interpreting
from sae_fast.kernels.launch import Launch


@triton.jit
def _columns(p_row, g_row, d0, d, BLOCK_D: tl.constexpr):
    """Columns d0 .. d0 + BLOCK_D of the row and its gradient in fp32 (0 past d), and their
    offsets and mask."""
    ds = d0 + tl.arange(0, BLOCK_D)
    ok = ds < d
    p = tl.load(p_row + ds, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_row + ds, mask=ok, other=0.0).to(tl.float32)
    return ds, ok, p, g


@triton.jit
def adam_rows_kernel(
    P, G, M, V, d, stride_p, stride_g, stride_m, stride_v,
    beta1, rest1, beta2, rest2, eps, step_size, bias2_sqrt,
    PROJECT: tl.constexpr, RENORMALISE: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # int64: m * d may pass 2^31
    p_row, g_row = P + row * stride_p, G + row * stride_g
    m_row, v_row = M + row * stride_m, V + row * stride_v
    along = 0.0
    if PROJECT:  # the gradient's component along the row: (g . p) / (p . p)
        dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
        norm_sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            _, _, p, g = _columns(p_row, g_row, d0, d, BLOCK_D)
            dot += g * p
            norm_sq += p * p
        total = tl.sum(norm_sq, 0)
        along = tl.where(total > 0, tl.sum(dot, 0) / tl.where(total > 0, total, 1.0), 0.0)
    new_sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        ds, ok, p, g = _columns(p_row, g_row, d0, d, BLOCK_D)
        if PROJECT:
            g = g - along * p
        m = tl.load(m_row + ds, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_row + ds, mask=ok, other=0.0).to(tl.float32)
        m = beta1 * m + rest1 * g
        v = beta2 * v + rest2 * g * g
        p = p - step_size * (m / (tl.sqrt(v) / bias2_sqrt + eps))
        stored = p.to(P.dtype.element_ty)
        tl.store(m_row + ds, m.to(M.dtype.element_ty), mask=ok)
        tl.store(v_row + ds, v.to(V.dtype.element_ty), mask=ok)
        tl.store(p_row + ds, stored, mask=ok)
        if RENORMALISE:
            kept = stored.to(tl.float32)
            new_sq += kept * kept
    if RENORMALISE:  # rows of zero norm stay zero
        norm = tl.sqrt(tl.sum(new_sq, 0))
        norm = tl.where(norm > 0, norm, 1.0)
        for d0 in range(0, d, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            ok = ds < d
            p = tl.load(p_row + ds, mask=ok, other=0.0).to(tl.float32)
            tl.store(p_row + ds, (p / norm).to(P.dtype.element_ty), mask=ok)


# Columns a program holds per trip (fp32 registers: 4 tensors of BLOCK_D / (32 * WARPS) each).
BLOCK_D, WARPS = 1024, 4
_INTERPRETED_BLOCK_D = 16  # several trips per row at test widths


def rows_of(t: Tensor) -> Tensor:
    """t as (rows, columns): a matrix as it is, a vector as one row."""
    return t.view(1, -1) if t.dim() == 1 else t


def plan(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, lr: float, beta1: float, beta2: float,
    eps: float, step: int, project: bool, renormalise: bool,
) -> Launch:  # fmt: skip
    """The launch of one Adam step over contiguous p, g, m, v (same shape; m, v of any float
    dtype) at step number step (1 for the first)."""
    p, g, m, v = (rows_of(t) for t in (p, g, m, v))
    rows, d = p.shape
    block = _INTERPRETED_BLOCK_D if interpreting() else min(BLOCK_D, triton.next_power_of_2(d))
    # 1 - beta in float64 here, rounded once: as torch's scalar arguments are.
    bias2_sqrt = math.sqrt(1 - beta2**step)
    scalars = (beta1, 1 - beta1, beta2, 1 - beta2, eps, lr / (1 - beta1**step), bias2_sqrt)
    strides = tuple(t.stride(0) for t in (p, g, m, v))
    meta = {"PROJECT": project, "RENORMALISE": renormalise, "BLOCK_D": block}
    if not interpreting():
        meta["num_warps"] = WARPS
    return Launch(adam_rows_kernel, (rows,), (p, g, m, v, d, *strides, *scalars), meta)


def adam_rows(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, lr: float, beta1: float, beta2: float,
    eps: float, step: int, project: bool = False, renormalise: bool = False,
) -> None:  # fmt: skip
    """Update p, m and v in place: one Adam step (the step-th) with gradient g, which is first
    projected off each row of p (project) and after which each row of p is rescaled to unit
    norm (renormalise). p, g, m, v: (rows, d) or (d,), contiguous."""
    for name, t in (("p", p), ("g", g), ("m", m), ("v", v)):
        if not t.is_contiguous() or t.shape != p.shape:
            raise ValueError(f"{name} must be contiguous with p's shape {tuple(p.shape)}")
    if p.numel():
        plan(
            p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step,
            project=project, renormalise=renormalise,
        ).run()  # fmt: skip
