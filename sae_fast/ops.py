"""Functional API of the sparse ops, with argument checks and backend dispatch.

x (n, d) activations; W_enc, W_dec (m, d); b_enc (m,); b_dec (d,); k active latents per row.
All ops are differentiable with respect to every floating input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import backends
from .validation import check_chunk_size, check_dead_mask, check_decode, check_encode


class SparseCode(NamedTuple):
    """A TopK code: values (..., k) in the input dtype and latent indices (..., k) int64.

    Per row, values are descending with ties to the lower index; zero values are padding.
    """

    values: Tensor
    indices: Tensor

    def to_dense(self, n_latents: int) -> Tensor:
        """Scatter into a dense (..., n_latents) latent tensor."""
        dense = self.values.new_zeros(*self.values.shape[:-1], n_latents)
        return dense.scatter(-1, self.indices, self.values)


def encode_topk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    *,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> SparseCode:
    """TopK(ReLU((x - b_dec) @ W_enc.T + b_enc)) without materialising the (n, m) matrix.

    x: (n, d); W_enc: (m, d); b_enc: (m,); b_dec: (d,) -> SparseCode (n, k) values in x's
    dtype and int64 indices, in canonical order. Rows with fewer than k positive
    pre-activations are padded with zeros at the lowest unused indices. chunk_size: latents
    per encoder chunk for the torch backend (None: chosen from a memory budget).
    """
    check_encode(x, W_enc, b_enc, b_dec, k)
    return _encode(x, W_enc, b_enc, b_dec, k, None, 0, backend, chunk_size)[0]


def encode_topk_auxk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    dead_mask: Tensor,
    k_aux: int,
    *,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> tuple[SparseCode, SparseCode]:
    """The TopK code and, from the same encoder pass, the AuxK code of Gao et al. 2024.

    dead_mask: (m,) bool, True for dead latents; k_aux: 1 <= k_aux <= m. Returns
    (code, aux_code): aux_code holds the top k_aux of relu(pre) among dead latents, live ones
    counting as 0, shape (n, k_aux), canonical order; its values are differentiable, so the
    AuxK loss trains the encoder without a second GEMM.
    """
    check_encode(x, W_enc, b_enc, b_dec, k)
    check_dead_mask(dead_mask, W_enc, k_aux)
    code, aux = _encode(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, backend, chunk_size)
    return code, aux


def _encode(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, backend, chunk_size) -> list[SparseCode]:
    """The backend's encoder on checked inputs: the TopK code, and the AuxK code with a
    dead_mask."""
    check_chunk_size(chunk_size)
    impl = backends.resolve(backend, x)
    outputs = impl.encode(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, chunk_size)
    return [SparseCode(*outputs[i : i + 2]) for i in range(0, len(outputs), 2)]


def decode(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec.

    values: (n, k) float; indices: (n, k) int64/int32 in [0, m); W_dec: (m, d); b_dec: (d,)
    -> x_hat (n, d) in W_dec's dtype.
    """
    check_decode(values, indices, W_dec, b_dec)
    impl = backends.resolve(backend, values, W_dec)
    return impl.decode(values, indices.long(), W_dec, b_dec)


def batch_topk_width(k: float, m: int) -> int:
    """The candidates each row first offers to batch_topk for an average of k latents per row:
    2k (rounded up), at most m."""
    return min(m, 2 * math.ceil(k))


def batch_topk(
    topk: Callable[[int], SparseCode],
    n: int,
    m: int,
    budget: int,
    width: int,
    candidates: SparseCode | None = None,
) -> SparseCode:
    """The top `budget` of relu(pre) over a batch of n rows (BatchTopK), from per-row TopK codes.

    topk(width) -> SparseCode (n, width): the rows' TopK codes (e.g. encode_topk over the batch);
    m latents; width: batch_topk_width(k, m) at first; candidates: a first (n, width) code, if
    one was computed. A row can hold more than
    k of the batch's winners, so each row offers `width` candidates; if some row had all of its
    positive candidates selected, its next latent might also win, and the selection is redone
    with twice the width. The kept entries of each row are a prefix of its canonical order, so
    the code (n, w) is trimmed to the widest, the others' values zero.
    """
    if not 1 <= width <= m:
        raise ValueError(f"width must be in [1, m={m}], got {width}")
    if not 0 <= budget <= n * m:
        raise ValueError(f"budget must be in [0, n*m={n * m}], got {budget}")
    while True:
        code = topk(width) if candidates is None else candidates
        candidates = None
        device = code.values.device
        order = torch.sort(code.values.detach().reshape(-1), descending=True, stable=True)
        keep = torch.zeros(n * width, dtype=torch.bool, device=device)
        keep[order.indices[:budget]] = True
        keep = keep.reshape(n, width)
        saturated = keep.all(dim=1) & (code.values[:, -1] > 0)
        if width == m or not bool(saturated.any()):
            break
        width = min(m, 2 * width)
    # At least one column, all zeros where nothing is kept (a budget of 0): a code to decode.
    used = max(int(keep.sum(dim=1).max()) if n else 0, 1)
    return SparseCode(code.values[:, :used] * keep[:, :used], code.indices[:, :used])
