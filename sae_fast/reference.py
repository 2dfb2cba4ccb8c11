"""Dense, obviously correct PyTorch: the oracle every fast path is tested against.

Everything here materialises the full (n, m) pre-activation matrix and works in any floating
dtype, float64 included. Shapes: x (n, d); W_enc, W_dec (m, d); b_enc (m,); b_dec (d,).
The math is that of docs/ARCHITECTURE.md ("The rules the code keeps").
"""

from __future__ import annotations

import torch
from torch import Tensor


def pre_activation(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """pre = (x - b_dec) @ W_enc.T + b_enc.  x: (n, d) -> (n, m)."""
    return (x - b_dec) @ W_enc.T + b_enc


def canonical_topk(acts: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row in canonical order: values descending, ties to the lower index.

    acts: (n, m) -> values (n, k), indices (n, k) int64. A stable descending sort keeps equal
    values in index order, which is exactly the tie rule.
    """
    values, indices = torch.sort(acts, dim=-1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """TopK activation: canonical top-k of relu(pre).  pre: (n, m) -> (n, k), (n, k).

    Rows with fewer than k positive entries fill the rest with zeros at the lowest unused
    indices, which the tie rule gives for free since relu maps them all to 0.
    """
    return canonical_topk(torch.relu(pre), k)


def encode_topk(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """TopK encoder.  x: (n, d) -> values (n, k), indices (n, k)."""
    return topk(pre_activation(x, W_enc, b_enc, b_dec), k)


def masked_topk(pre: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of relu(pre) among latents where mask (m,) is True; others count as 0.

    The AuxK code over dead latents: (n, m) -> values (n, k), indices (n, k), canonical order.
    """
    return canonical_topk(torch.relu(pre).masked_fill(~mask, 0.0), k)


def relu(pre: Tensor) -> Tensor:
    """ReLU activation (trained with an L1 penalty).  (n, m) -> (n, m)."""
    return torch.relu(pre)


def batchtopk(pre: Tensor, k: int) -> Tensor:
    """BatchTopK: keep the top n*k entries of relu(pre) over the whole batch.  (n, m) -> (n, m).

    Ties go to the lower flat (row-major) index, as the per-row rule does.
    """
    acts = torch.relu(pre)
    flat = acts.reshape(-1)
    _, keep = canonical_topk(flat.unsqueeze(0), min(pre.shape[0] * k, flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[keep.squeeze(0)] = True
    return acts * mask.reshape(acts.shape)


def threshold_relu(pre: Tensor, threshold: Tensor | float) -> Tensor:
    """relu(pre) where pre > threshold, else 0: BatchTopK at inference.  (n, m) -> (n, m)."""
    return torch.relu(pre) * (pre > threshold)


class _JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - theta), with a straight-through estimate of dz/dtheta.

    Rajamanoharan et al. 2024: the Heaviside step gets the pseudo-derivative
    -(theta / eps) * rect((pre - theta) / eps) with respect to theta; pre gets H(pre - theta).
    """

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        window = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        grad_threshold = (grad * -(threshold / eps) * window).sum(dim=0)
        return grad_pre, grad_threshold, None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float = 1e-3) -> Tensor:
    """JumpReLU with per-latent threshold.  pre: (n, m), threshold: (m,) -> (n, m)."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


class _Step(torch.autograd.Function):
    """H(pre - theta) with the straight-through pseudo-derivative of JumpReLU's L0 penalty.

    Rajamanoharan et al. 2024: d/dtheta H(pre - theta) is taken as -(1 / eps) rect((pre -
    theta) / eps); pre gets no gradient, so the L0 penalty trains only the thresholds.
    """

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        return None, (grad * window).sum(dim=0) * (-1.0 / eps), None


def jumprelu_l0(pre: Tensor, threshold: Tensor, bandwidth: float = 1e-3) -> Tensor:
    """Mean over tokens of the number of latents above threshold, with the STE gradient.

    pre: (n, m), threshold: (m,) -> scalar; JumpReLU's sparsity penalty.
    """
    return _Step.apply(pre, threshold, bandwidth).sum(dim=-1).mean()


def gated_encode(
    x: Tensor,
    W_enc: Tensor,
    b_gate: Tensor,
    r_mag: Tensor,
    b_mag: Tensor,
    b_dec: Tensor,
) -> tuple[Tensor, Tensor]:
    """Gated encoder (Rajamanoharan et al. 2024) with W_mag = exp(r_mag) * W_gate, W_gate = W_enc.

    x: (n, d) -> z (n, m), pi_gate (n, m); pi_gate feeds the gate's L1 and auxiliary losses.
    """
    pi_gate = pre_activation(x, W_enc, b_gate, b_dec)
    pi_mag = torch.exp(r_mag) * (pi_gate - b_gate) + b_mag
    return (pi_gate > 0).to(x.dtype) * torch.relu(pi_mag), pi_gate


def sparse_to_dense(values: Tensor, indices: Tensor, n_latents: int) -> Tensor:
    """Scatter a sparse code into a dense latent matrix.  (n, k), (n, k) -> (n, m)."""
    dense = values.new_zeros(values.shape[0], n_latents)
    return dense.scatter(1, indices, values)


def decode_dense(z: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """x_hat = z @ W_dec + b_dec.  z: (n, m) -> (n, d)."""
    return z @ W_dec + b_dec


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec.  (n, k), (n, k) -> (n, d)."""
    return decode_dense(sparse_to_dense(values, indices, W_dec.shape[0]), W_dec, b_dec)


def clt_decode(z: Tensor, W_dec: list[Tensor], b_dec: Tensor) -> Tensor:
    """A cross-layer transcoder's outputs from its codes, by the definition: target t gets
    `b_dec[t] + sum(z[i] @ W_dec[i][:, t - i])` over source layers i <= t.

    z: (L, n, m) dense codes; W_dec[i]: (m, L - i, d_out); b_dec: (L, d_out) -> (L, n, d_out).
    """
    L = z.shape[0]
    return torch.stack(
        [b_dec[t] + sum(z[i] @ W_dec[i][:, t - i] for i in range(t + 1)) for t in range(L)]
    )


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean over all elements of (x - x_hat)^2."""
    return (x - x_hat).pow(2).mean()


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: ||x - x_hat||^2 / ||x - mean(x)||^2 over the batch."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()


def l1_penalty(z: Tensor, W_dec: Tensor, coefficient: float = 1.0) -> Tensor:
    """coefficient * sum_j z_j * ||W_dec[j]||, averaged over tokens.  z: (n, m)."""
    return coefficient * (z * W_dec.norm(dim=1)).sum(dim=1).mean()


def auxk_loss(
    x: Tensor, x_hat: Tensor, pre: Tensor, W_dec: Tensor, dead_mask: Tensor, k_aux: int
) -> Tensor:
    """AuxK loss (Gao et al. 2024): dead latents reconstruct the residual.

    The top-k_aux of relu(pre) among latents with dead_mask (m,) True decode (without b_dec)
    the residual e = x - x_hat, which is held fixed; the squared error is normalised by the
    variance of x. Returns 0 when no latent is dead.
    """
    if not bool(dead_mask.any()):
        return x.new_zeros(())
    values, indices = masked_topk(pre, dead_mask, min(k_aux, int(dead_mask.sum())))
    e_hat = sparse_to_dense(values, indices, W_dec.shape[0]) @ W_dec
    e = (x - x_hat).detach()
    return (e_hat - e).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()


def matryoshka_loss(
    x: Tensor, z: Tensor, W_dec: Tensor, b_dec: Tensor, prefixes: list[int]
) -> Tensor:
    """Mean over prefix sizes p of sum_d (x - z[:, :p] @ W_dec[:p] - b_dec)^2, mean over
    tokens (training/losses.py).  x: (n, d), z: (n, m) dense code."""
    errors = [(x - (z[:, :p] @ W_dec[:p] + b_dec)).pow(2).sum(-1).mean() for p in prefixes]
    return torch.stack(errors).mean()
