"""``torch`` backend decoder: x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec by gather.

No (n, m) latent matrix is built in either direction: forward gathers the k decoder rows of
each token, backward scatters into the rows that were used and takes row dot products.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .sparse_pairs import gather_dot, gather_sum, scatter_rows


class TorchDecode(torch.autograd.Function):
    """x_hat (n, d) from values (n, k), indices (n, k), W_dec (m, d), b_dec (d,)."""

    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec):
        ctx.save_for_backward(values, indices, W_dec)
        return (gather_sum(indices, values, W_dec) + b_dec).to(W_dec.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x_hat):
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W_dec = grad_b_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = gather_dot(indices, W_dec, grad_x_hat).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W_dec = scatter_rows(indices, values, grad_x_hat, W_dec.shape[0])
            grad_W_dec = grad_W_dec.to(W_dec.dtype)
        if ctx.needs_input_grad[3]:
            grad_b_dec = grad_x_hat.sum(dim=0).to(W_dec.dtype)
        return grad_values, None, grad_W_dec, grad_b_dec


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Differentiable gather decode.  (n, k), (n, k) -> (n, d)."""
    return TorchDecode.apply(values, indices, W_dec, b_dec)
