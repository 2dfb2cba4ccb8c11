"""Eager PyTorch primitives over the n*k (token, latent) pairs of a sparse code.

They back the ``torch`` backend's decode and both backward passes. Work runs in token blocks
so the (block, k, d) gathers stay under a fixed element budget: extra memory never grows
with n*k*d, let alone n*m. Half-precision inputs accumulate in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements of one (block, k, d) temporary: 2^22 float32 values = 16 MiB.
BLOCK_ELEMENTS = 1 << 22


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for 16-bit floats, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _token_blocks(n: int, k: int, d: int):
    step = max(1, BLOCK_ELEMENTS // max(1, k * d))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _gathered(indices: Tensor, W: Tensor):
    """Yield (token block, W[indices[block]] as (b, k, d) in the acc dtype)."""
    n, k = indices.shape
    acc = acc_dtype(W.dtype)
    for blk in _token_blocks(n, k, W.shape[1]):
        yield blk, W[indices[blk]].to(acc)


def gather_sum(indices: Tensor, coeff: Tensor, W: Tensor) -> Tensor:
    """out[t] = sum_j coeff[t, j] * W[indices[t, j]].  (n, k), (n, k), (m, d) -> (n, d)."""
    out = W.new_empty(indices.shape[0], W.shape[1], dtype=acc_dtype(W.dtype))
    for blk, rows in _gathered(indices, W):
        out[blk] = torch.bmm(coeff[blk].to(out.dtype).unsqueeze(1), rows).squeeze(1)
    return out


def gather_dot(indices: Tensor, W: Tensor, rows: Tensor) -> Tensor:
    """out[t, j] = W[indices[t, j]] . rows[t].  (n, k), (m, d), (n, d) -> (n, k) acc dtype."""
    out = W.new_empty(indices.shape, dtype=acc_dtype(W.dtype))
    for blk, gathered in _gathered(indices, W):
        out[blk] = torch.bmm(gathered, rows[blk].to(out.dtype).unsqueeze(2)).squeeze(2)
    return out


def scatter_rows(indices: Tensor, coeff: Tensor, rows: Tensor, n_latents: int) -> Tensor:
    """out[l] = sum over pairs (t, j) with indices[t, j] == l of coeff[t, j] * rows[t].

    (n, k), (n, k), (n, d) -> (m, d) in the acc dtype, by index_add over the pairs.
    """
    n, k = indices.shape
    d = rows.shape[1]
    acc = acc_dtype(rows.dtype)
    out = torch.zeros(n_latents, d, dtype=acc, device=rows.device)
    for blk in _token_blocks(n, k, d):
        contrib = coeff[blk].to(acc).unsqueeze(2) * rows[blk].to(acc).unsqueeze(1)  # (b, k, d)
        out.index_add_(0, indices[blk].reshape(-1), contrib.reshape(-1, d))
    return out


def scatter_values(indices: Tensor, coeff: Tensor, n_latents: int) -> Tensor:
    """out[l] = sum of coeff[t, j] over pairs with indices[t, j] == l.  -> (m,) acc dtype."""
    acc = acc_dtype(coeff.dtype)
    out = torch.zeros(n_latents, dtype=acc, device=coeff.device)
    return out.index_add_(0, indices.reshape(-1), coeff.reshape(-1).to(acc))
