"""``torch`` backend decoder: x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec.

One fused gather-sum (embedding_bag with per-sample weights, each row of indices a bag), so no
(n, m) latent matrix and no (n, k, d) temporary is built. Its native backward is the sparse one:
grad W_dec accumulates values[t, j] * grad_x_hat[t] into the rows that were used, and grad
values[t, j] is the row dot product W_dec[indices[t, j]] . grad_x_hat[t].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gather_sum(indices: Tensor, coeff: Tensor, W: Tensor) -> Tensor:
    """out[t] = sum_j coeff[t, j] * W[indices[t, j]].  (n, k), (n, k), (m, d) -> (n, d)."""
    return F.embedding_bag(indices, W, per_sample_weights=coeff, mode="sum")


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Differentiable gather decode.  (n, k), (n, k) -> (n, d)."""
    return gather_sum(indices, values, W_dec) + b_dec


def scatter_rows(indices: Tensor, coeff: Tensor, rows: Tensor, W: Tensor) -> Tensor:
    """grad[l] = sum over pairs (t, j) with indices[t, j] == l of coeff[t, j] * rows[t].

    (n, k), (n, k), (n, d), W (m, d) for shape and dtype -> (m, d): the sparse weight gradient
    of gather_sum, taken from its native backward.
    """
    with torch.enable_grad():
        leaf = W.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(gather_sum(indices, coeff.to(W.dtype), leaf), leaf, rows)
    return grad
