"""The ``torch`` backend: sparse-aware eager PyTorch, on any device and floating dtype.

Encoder: (x - b_dec) @ W_enc.T + b_enc -> ReLU -> TopK, in latent chunks.

Forward streams over chunks of latents with a running top-k, so extra memory is O(n * chunk),
never O(n * m). Selection is exact in the canonical order (values descending, ties to the
lower index) at the cost of small sorts only:
- each chunk offers its top k by a plain top-k; a row whose k-th and (k+1)-th positive values
  tie exactly (rare in float data) is redone with a stable sort of that row's chunk;
- candidates merge by a sort on latent index then a stable sort on value, over (n, 2k);
- zero values are only padding: at the end, rows with fewer than k positive values get the
  lowest latent indices not already used, which all lie in [0, k).
Backward: the shared pair-sparse one (pairs.encoder_backward). Decoder: pairs.gather_sum,
whose native backward is the sparse one (grad W_dec into the rows used, grad values as row
dot products).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .pairs import gather_sum, pre_chunks, zero_fill
from .registry import Backend, register

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
    """A chunk's top min(k, c) of pre-activations (n, c), exact for positive values.

    Non-positive values may come out in any order; zero_fill replaces them.
    """
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


class _RunningTopK:
    """Canonical top-k of ReLU over latent chunks fed in index order."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.values = self.indices = None

    def add(self, pre: Tensor, start: int) -> None:
        """Merge the pre-activations (n, c) of latents start .. start + c - 1."""
        values, indices = _chunk_candidates(pre, start, self.k)
        if self.values is not None:
            values = torch.cat([self.values, values], dim=1)
            indices = torch.cat([self.indices, indices], dim=1)
        self.values, self.indices = _canonical_merge(values, indices, self.k)

    def result(self) -> tuple[Tensor, Tensor]:
        return zero_fill(self.values, self.indices)


def encoder_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    dead_mask: Tensor | None,
    k_aux: int,
    chunk_size: int | None,
) -> tuple[Tensor, ...]:
    """Chunked encoder forward.  x: (n, d) -> values (n, k) in x.dtype, indices (n, k) int64.

    With dead_mask (m,) bool and k_aux, also the AuxK code from the same pre-activations:
    the top k_aux of relu(pre) among dead latents (others count as 0), (n, k_aux) each.
    chunk_size: latents per chunk (None: from CHUNK_BYTES).
    """
    n, m = x.shape[0], W_enc.shape[0]
    chunk = auto_chunk_size(n, m, k, x.element_size()) if chunk_size is None else chunk_size
    chunk = max(chunk, k, k_aux)
    main = _RunningTopK(k)
    aux = _RunningTopK(k_aux) if dead_mask is not None else None
    # No ReLU pass over a chunk: only positive values survive zero_fill, and ReLU keeps
    # their order.
    for start, pre, _ in pre_chunks(x - b_dec, W_enc, b_enc, chunk):
        main.add(pre, start)
        if aux is not None:
            aux.add(pre.masked_fill(~dead_mask[start : start + pre.shape[1]], 0.0), start)
    return main.result() + (aux.result() if aux is not None else ())


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Differentiable gather decode.  (n, k), (n, k) -> (n, d)."""
    return gather_sum(W_dec, values, indices, b_dec)


register(Backend(name="torch", priority=0, encoder_forward=encoder_forward, decode=decode))
