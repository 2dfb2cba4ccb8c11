"""``torch`` backend encoder: (x - b_dec) @ W_enc.T + b_enc -> ReLU -> TopK, in latent chunks.

Forward streams over chunks of latents with a running top-k, so extra memory is O(n * chunk),
never O(n * m). Selection is exact in the canonical order (values descending, ties to the
lower index): for 16/32-bit floats each candidate becomes one int64 key, the float32 bits of
its (non-negative) value above the bit-flipped latent index, so a plain integer top-k orders
by value then index. float64 values do not fit beside an index, so they merge by a stable
sort instead. Backward touches only the n*k selected pairs (see sparse_pairs).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .sparse_pairs import gather_sum, scatter_rows, scatter_values

# Extra bytes the encoder may use for one chunk of pre-activations and their keys.
CHUNK_BYTES = 64 << 20
_LOW32 = 0xFFFFFFFF
# Bytes per chunk element: the pre-activation (up to 8), a float32 copy and an int64 key.
_BYTES_PER_ELEMENT = 20


def auto_chunk_size(n: int, m: int, k: int) -> int:
    """Latents per chunk so one chunk's temporaries fit in CHUNK_BYTES (at least k and 256)."""
    chunk = CHUNK_BYTES // (max(n, 1) * _BYTES_PER_ELEMENT)
    chunk = max(chunk // 256 * 256, 256, k)
    return min(chunk, m)


def _keys(acts: Tensor, first_index: int) -> Tensor:
    """int64 keys ordering (value desc, index asc) for acts >= 0.  (n, c) -> (n, c)."""
    bits = acts.float().view(torch.int32).to(torch.int64) & 0x7FFFFFFF  # drops the sign of -0.0
    index = torch.arange(first_index, first_index + acts.shape[1], device=acts.device)
    return (bits << 32) | (_LOW32 - index)


def _unkey(keys: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Inverse of _keys: int64 keys -> values in dtype, int64 indices."""
    values = (keys >> 32).to(torch.int32).view(torch.float32).to(dtype)
    return values, _LOW32 - (keys & _LOW32)


def _stable_merge(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Canonical top-k of candidates already in index order for equal values."""
    values, order = torch.sort(values, dim=1, descending=True, stable=True)
    return values[:, :k], indices.gather(1, order[:, :k])


def topk_forward(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, chunk_size: int | None
) -> tuple[Tensor, Tensor]:
    """Chunked encoder forward.  x: (n, d) -> values (n, k) in x.dtype, indices (n, k) int64."""
    n, m = x.shape[0], W_enc.shape[0]
    chunk = auto_chunk_size(n, m, k) if chunk_size is None else max(chunk_size, k)
    xc = x - b_dec
    exact_keys = x.dtype != torch.float64
    best_keys = best_values = best_indices = None
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        acts = torch.addmm(b_enc[start:stop], xc, W_enc[start:stop].T).relu_()
        if exact_keys:
            keys = _keys(acts, start).topk(min(k, stop - start), dim=1).values
            if best_keys is not None:
                keys = torch.cat([best_keys, keys], dim=1).topk(k, dim=1).values
            best_keys = keys
        else:
            # Earlier chunks hold lower indices, so [best, chunk] is in index order for ties.
            index = torch.arange(start, stop, device=x.device).expand(n, -1)
            if best_values is not None:
                acts = torch.cat([best_values, acts], dim=1)
                index = torch.cat([best_indices, index], dim=1)
            best_values, best_indices = _stable_merge(acts, index, k)
    if exact_keys:
        return _unkey(best_keys, x.dtype)
    return best_values, best_indices


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
