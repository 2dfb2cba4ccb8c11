"""Bounded per-row heaps on tensors: for each of `rows` features, the `size` entries of highest
score offered so far, each with a payload (its context, its token's other latents).

A streaming pass offers a batch of (row, score) entries at a time. `select` finds the few that
would enter, so the caller builds payloads only for those; `insert` merges them in. Memory is
rows * size payloads whatever the number of entries offered: with the activation as the score
these are the top examples, with a uniform random score a uniform sample without replacement
of all the entries (each entry's key is independent, so the kept ones are any `size` of them
with equal chance).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rank_within(row: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
    """(order, rank): the entries sorted by row, then score descending, and each sorted
    entry's rank within its row (0 for the row's best).  row, score: (c,)."""
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(row[order], stable=True)]
    sorted_row = row[order]
    _, counts = torch.unique_consecutive(sorted_row, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(row.numel(), device=row.device) - torch.repeat_interleave(starts, counts)
    return order, rank


class BestK:
    """score: (rows, size), descending per row, -inf where empty; payload: name -> (rows, size,
    *shape) tensors, aligned with score."""

    def __init__(
        self,
        rows: int,
        size: int,
        payload: dict[str, tuple[tuple[int, ...], torch.dtype]],
        device: torch.device | str = "cpu",
    ) -> None:
        self.size = size
        self.score = torch.full((rows, size), -torch.inf, device=device)
        self.payload = {
            name: torch.zeros((rows, size, *shape), dtype=dtype, device=device)
            for name, (shape, dtype) in payload.items()
        }

    def select(self, row: Tensor, score: Tensor) -> Tensor:
        """Indices of the offered entries (row, score: (c,)) that would be kept: above their
        row's current last, and among the row's `size` best of this offer."""
        above = (score > self.score[row, -1]).nonzero().squeeze(1)
        order, rank = rank_within(row[above], score[above])
        return above[order[rank < self.size]]

    def insert(self, row: Tensor, score: Tensor, **payload: Tensor) -> None:
        """Merge in entries (row, score: (c,), payload tensors (c, *shape)); at most `size`
        per row (what `select` returns)."""
        if row.numel() == 0:
            return
        rows, local = torch.unique(row, return_inverse=True)
        order, rank = rank_within(local, score)
        slot = torch.empty_like(rank)
        slot[order] = rank
        new_score = torch.full((rows.numel(), self.size), -torch.inf, device=score.device)
        new_score[local, slot] = score.to(new_score.dtype)
        merged = torch.cat([self.score[rows], new_score], dim=1)
        best = merged.topk(self.size, dim=1, sorted=True)
        self.score[rows] = best.values
        for name, held in self.payload.items():
            fresh = held.new_zeros((rows.numel(), self.size, *held.shape[2:]))
            fresh[local, slot] = payload[name].to(held.dtype)
            both = torch.cat([held[rows], fresh], dim=1)
            pick = best.indices.view(*best.indices.shape, *([1] * (held.ndim - 2)))
            held[rows] = both.gather(1, pick.expand(-1, -1, *held.shape[2:]))

    def filled(self) -> Tensor:
        """(rows, size) bool: the slots that hold an entry."""
        return self.score > -torch.inf
