"""``torch`` backend encoder: (x - b_dec) @ W_enc.T + b_enc -> ReLU -> TopK, in latent chunks.

Forward streams over chunks of latents with a running top-k, so extra memory is O(n * chunk),
never O(n * m). Selection is exact in the canonical order (values descending, ties to the
lower index) at the cost of small sorts only:
- each chunk offers its top k by a plain top-k; a row whose k-th and (k+1)-th positive values
  tie exactly (rare in float data) is redone with a stable sort of that row's chunk;
- candidates merge by a sort on latent index then a stable sort on value, over (n, 2k);
- zero values are only padding: at the end, rows with fewer than k positive values get the
  lowest latent indices not already used, which all lie in [0, k).
Backward touches only the n*k selected pairs (see sparse_pairs).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .sparse_pairs import gather_sum, scatter_rows, scatter_values

# Extra bytes the encoder may use for one chunk of pre-activations.
CHUNK_BYTES = 64 << 20


def auto_chunk_size(n: int, m: int, k: int, itemsize: int) -> int:
    """Latents per chunk so one (n, chunk) block fits in CHUNK_BYTES (at least k and 256)."""
    chunk = CHUNK_BYTES // (max(n, 1) * itemsize)
    chunk = max(chunk // 256 * 256, 256, k)
    return min(chunk, m)


def _canonical_merge(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of candidate lists (n, w) in canonical order: by index, then stably by value."""
    indices, by_index = indices.sort(dim=1)
    values, order = values.gather(1, by_index).sort(dim=1, descending=True, stable=True)
    return values[:, :k], indices.gather(1, order[:, :k])


def _chunk_candidates(acts: Tensor, start: int, k: int) -> tuple[Tensor, Tensor]:
    """A chunk's top min(k, c) of acts (n, c) >= 0, exact for positive values -> (n, <=k) x2."""
    n, c = acts.shape
    if c <= k:
        return acts, torch.arange(start, start + c, device=acts.device).expand(n, c)
    values, pos = acts.topk(k + 1, dim=1)
    tied = (values[:, k - 1] == values[:, k]) & (values[:, k - 1] > 0)
    values, pos = values[:, :k], pos[:, :k]
    if bool(tied.any()):
        # The chunk's columns are in index order, so a stable sort breaks ties canonically.
        rows = tied.nonzero().squeeze(1)
        row_values, row_pos = acts[rows].sort(dim=1, descending=True, stable=True)
        values[rows], pos[rows] = row_values[:, :k], row_pos[:, :k]
    return values, pos + start


def _zero_fill(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Replace non-positive entries (a suffix of each row) by 0 at the lowest unused indices."""
    n, k = values.shape
    keep = ~(values <= 0)  # NaN stays visible
    slot = torch.where(keep & (indices < k), indices, k)
    used = torch.zeros(n, k + 1, dtype=torch.int8, device=values.device).scatter_(1, slot, 1)
    free = used[:, :k].sort(dim=1, stable=True).indices  # unused indices < k, ascending
    rank = torch.arange(k, device=values.device) - keep.sum(dim=1, keepdim=True)
    fill = free.gather(1, rank.clamp_min(0))
    return torch.where(keep, values, 0.0), torch.where(keep, indices, fill)


def topk_forward(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, chunk_size: int | None
) -> tuple[Tensor, Tensor]:
    """Chunked encoder forward.  x: (n, d) -> values (n, k) in x.dtype, indices (n, k) int64."""
    n, m = x.shape[0], W_enc.shape[0]
    chunk = auto_chunk_size(n, m, k, x.element_size()) if chunk_size is None else chunk_size
    chunk = max(chunk, k)
    xc = x - b_dec
    values = indices = None
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        acts = torch.addmm(b_enc[start:stop], xc, W_enc[start:stop].T).relu_()
        chunk_values, chunk_indices = _chunk_candidates(acts, start, k)
        if values is not None:
            chunk_values = torch.cat([values, chunk_values], dim=1)
            chunk_indices = torch.cat([indices, chunk_indices], dim=1)
        values, indices = _canonical_merge(chunk_values, chunk_indices, k)
    return _zero_fill(values, indices)


class TorchEncodeTopK(torch.autograd.Function):
    """values, indices = TopK(ReLU((x - b_dec) @ W_enc.T + b_enc)) with a pair-sparse backward."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, chunk_size):
        values, indices = topk_forward(x, W_enc, b_enc, b_dec, k, chunk_size)
        ctx.save_for_backward(x, W_enc, b_dec, values, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values, _grad_indices):
        x, W_enc, b_dec, values, indices = ctx.saved_tensors
        m = W_enc.shape[0]
        # ReLU passes gradient only where the selected value is positive; zero fills get none.
        grad_pre = grad_values * (values > 0)
        grad_x = grad_W_enc = grad_b_enc = grad_b_dec = None
        if ctx.needs_input_grad[1]:
            grad_W_enc = scatter_rows(indices, grad_pre, x - b_dec, m).to(W_enc.dtype)
        if ctx.needs_input_grad[2]:
            grad_b_enc = scatter_values(indices, grad_pre, m).to(W_enc.dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            grad_xc = gather_sum(indices, grad_pre, W_enc)
            if ctx.needs_input_grad[0]:
                grad_x = grad_xc.to(x.dtype)
            if ctx.needs_input_grad[3]:
                grad_b_dec = -grad_xc.sum(dim=0).to(b_dec.dtype)
        return grad_x, grad_W_enc, grad_b_enc, grad_b_dec, None, None


def encode_topk(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, chunk_size: int | None
) -> tuple[Tensor, Tensor]:
    """Differentiable chunked TopK encoder.  x: (n, d) -> values (n, k), indices (n, k)."""
    return TorchEncodeTopK.apply(x, W_enc, b_enc, b_dec, k, chunk_size)
