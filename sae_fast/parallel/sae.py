"""ShardedSparseAutoencoder: one process's block of latents of a TopK/BatchTopK SAE."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops import SparseCode
from ..sae import SparseAutoencoder, autocast_inputs
from ..sae_config import check_hyperparameters
from .ops import (
    InGroup,
    check_block,
    own_pairs,
    sharded_decode,
    sharded_encode_topk,
    sharded_encode_topk_auxk,
    sum_over_group,
)


class ShardedSparseAutoencoder(InGroup, SparseAutoencoder):
    """Latents [offset, offset + size) of an SAE of n_latents latents, on one rank of group.

    W_enc, b_enc, W_dec: (size, d_in), this block's rows; b_dec (d_in,) is the same on every
    rank (its gradient comes out whole on each, sae_fast.parallel.ops). encode and decode run the
    sharded ops: the code (n, k) has global indices and is the same on every rank of group,
    and so is x_hat; n_latents and config() are the whole SAE's. Dense activations (relu,
    jumprelu, gated) are not sharded.
    """

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        *,
        offset: int,
        size: int,
        group: dist.ProcessGroup | None = None,
        k: int,
        activation: str = "topk",
        matryoshka: list[int] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> None:
        check_block("SAE", activation, offset, size, n_latents)
        check_hyperparameters(d_in, n_latents, k, activation, "none", 1.0, matryoshka)
        super().__init__(
            d_in, size, k=min(k, size), activation=activation, dtype=dtype, device=device,
            backend=backend,
        )  # fmt: skip
        self.n_latents, self.k = n_latents, k
        self.matryoshka = list(matryoshka) if matryoshka is not None else None  # global sizes
        self.latent_offset, self.group = offset, group

    def _topk(self, x: Tensor, k: int) -> SparseCode:
        return sharded_encode_topk(
            *autocast_inputs(x, self.W_enc, self.b_enc, self.center),
            k,
            offset=self.latent_offset,
            group=self.group,
            backend=self.backend,
        )

    def _topk_auxk(
        self, x: Tensor, k: int, dead_mask: Tensor, k_aux: int
    ) -> tuple[SparseCode, SparseCode]:
        return sharded_encode_topk_auxk(
            *autocast_inputs(x, self.W_enc, self.b_enc, self.center),
            k,
            dead_mask,
            k_aux,
            offset=self.latent_offset,
            group=self.group,
            backend=self.backend,
        )

    def _decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        values, W_dec, b_dec = autocast_inputs(values, self.W_dec, self.b_dec)
        return sharded_decode(
            values, indices, W_dec, b_dec, offset=self.latent_offset, group=self.group,
            backend=self.backend,
        )  # fmt: skip

    def own_pairs(self, values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """This shard's pairs of a global code (n, k): their values (zero for the other
        shards' latents) and their rows of this shard's W_dec."""
        return own_pairs(values, indices, self.latent_offset, self.W_dec.shape[0])

    def sum_shards(self, t: Tensor) -> Tensor:
        """The sum of t over the group (each shard holds its latents' part), on every rank."""
        return sum_over_group(t, self.group)

    def count_latents(self, mask: Tensor) -> int:
        """How many latents of the whole SAE mask marks (this rank's (size,) part of it)."""
        total = mask.sum().reshape(1)
        dist.all_reduce(total, group=self.group)
        return int(total)

    def _encode(self, x: Tensor):
        if self.activation == "batchtopk" and not (self.training or self.threshold < 0):
            raise RuntimeError(
                "a latent-sharded batchtopk SAE encodes in training mode only; export it and "
                "load the whole SAE for inference with its threshold"
            )
        return super()._encode(x)
