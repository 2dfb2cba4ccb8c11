"""ShardedCrossLayerTranscoder: one process's block of features, at every layer, of a
TopK/BatchTopK cross-layer transcoder."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..clt.module import CrossLayerTranscoder
from ..ops import SparseCode
from .ops import InGroup, check_block, sharded_decode, sharded_encode_topk, sharded_encode_topk_auxk


class ShardedCrossLayerTranscoder(InGroup, CrossLayerTranscoder):
    """Features [offset, offset + size) of every layer of a CLT of n_latents features per
    layer, on one rank of group, with all their decoders.

    W_enc (L, size, d_in), b_enc (L, size) and W_dec[i] (size, L - i, d_out) are this block's
    rows; b_dec and W_skip are the same on every rank (their gradients come out whole on
    each). Each layer's code comes from the sharded TopK (global indices, the same on every
    rank) and each decode is a sharded gather-sum summed over group, so y_hat is the same on
    every rank and equals one process's; n_latents and config() are the whole CLT's. The
    dense activations (relu, jumprelu, calibrated batchtopk) are not sharded.
    """

    def __init__(
        self,
        n_layers: int,
        d_in: int,
        n_latents: int,
        *,
        offset: int,
        size: int,
        group: dist.ProcessGroup | None = None,
        k: int,
        activation: str = "topk",
        d_out: int | None = None,
        skip_connection: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> None:
        check_block("CLT", activation, offset, size, n_latents, unit="features")
        super().__init__(
            n_layers, d_in, size, k=min(k, size), activation=activation, d_out=d_out,
            skip_connection=skip_connection, dtype=dtype, device=device, backend=backend,
        )  # fmt: skip
        if k > n_latents:
            raise ValueError(f"k={k} is larger than the dictionary (n_latents={n_latents})")
        self.n_latents, self.k = n_latents, k
        self.latent_offset, self.group = offset, group

    def _sparse_path(self) -> bool:
        if not super()._sparse_path():
            raise RuntimeError(
                "a latent-sharded batchtopk CLT encodes in training mode only; save the whole "
                "CLT for inference with its thresholds"
            )
        return True

    def _layer_topk(self, inputs: tuple[Tensor, ...], width: int) -> SparseCode:
        options = {"offset": self.latent_offset, "group": self.group, "backend": self.backend}
        return sharded_encode_topk(*inputs, width, **options)

    def _layer_topk_auxk(
        self, inputs: tuple[Tensor, ...], width: int, dead: Tensor, k_aux: int
    ) -> tuple[SparseCode, SparseCode]:
        options = {"offset": self.latent_offset, "group": self.group, "backend": self.backend}
        return sharded_encode_topk_auxk(*inputs, width, dead, k_aux, **options)

    def _gather(self, values: Tensor, indices: Tensor, rows: Tensor) -> Tensor:
        zero = rows.new_zeros(rows.shape[1])
        options = {"offset": self.latent_offset, "group": self.group, "backend": self.backend}
        return sharded_decode(values, indices, rows, zero, **options)

    def count_features(self, mask: Tensor) -> Tensor:
        """(L,): per layer, how many features of the whole CLT mask marks (this rank's
        (L, size) part of it)."""
        counts = mask.sum(dim=1)
        dist.all_reduce(counts, group=self.group)
        return counts


def gather_features(t: Tensor, dim: int | None, group: dist.ProcessGroup | None) -> Tensor:
    """A latent shard's block t of a CLT tensor, whole: every rank's block of group along dim
    in rank order (dim None, or no group: t, which every rank holds whole)."""
    if dim is None or group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
