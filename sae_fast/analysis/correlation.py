"""Two SAEs' latents matched by activation correlation over the same tokens.

The Pearson correlation of latent a of A and latent b of B over n tokens needs their sums,
sums of squares and the cross sum of a * b. The cross sum is nonzero only for pairs that
fire together on some token, and a pair that never does has r = -mean_a mean_b / (sd_a sd_b)
<= 0: each latent's best positively correlated partner is always a co-firing one (a latent
whose co-firing partners all correlate negatively has no match). So only co-firing pairs are
kept, as sorted unique keys a * m_b + b with their cross sums, merged every FLUSH_PAIRS new
(token, pair) entries, and a batch's pairs are formed CHUNK_PAIRS at a time. Memory grows
with the number of distinct co-firing pairs (at most tokens * k_a * k_b), never with
m_a * m_b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import SparseCode
from .best_k import rank_within
from .features import active_rows

FLUSH_PAIRS = 1 << 24
CHUNK_PAIRS = 1 << 22  # (token, a, b) candidates formed at a time


@dataclass
class Correlations:
    """best_ab (m_a,): each A latent's best positively correlated B latent (-1: none), r_ab its
    correlation (nan: none); best_ba, r_ba the same from B; pairs: the co-firing pairs kept."""

    best_ab: Tensor
    r_ab: Tensor
    best_ba: Tensor
    r_ba: Tensor
    pairs: int

    def summary(self, best_decoder_ab: Tensor, thresholds: tuple[float, ...]) -> dict:
        """The fractions of all latents above thresholds each way; over the latents with a
        match, the mean best correlation and how often the best correlated partner is the
        best decoder match (best_decoder_ab)."""
        has = self.best_ab >= 0

        def above(r: Tensor, t: float) -> float:
            return (torch.nan_to_num(r, nan=-1.0) > t).double().mean().item()

        def mean(r: Tensor) -> float | None:  # None, not NaN, in strict JSON
            return r.mean().item() if r.numel() else None

        return {
            "co_firing_pairs": self.pairs,
            "matched_a": int(has.sum()),
            "matched_b": int((self.best_ba >= 0).sum()),
            "mean_best_r_a_to_b": mean(self.r_ab[has]),
            "mean_best_r_b_to_a": mean(self.r_ba[self.best_ba >= 0]),
            # Of the A latents with a match.
            "same_as_decoder_match": mean((self.best_ab == best_decoder_ab)[has].double()),
            "shared": {
                str(t): {"a_to_b": above(self.r_ab, t), "b_to_a": above(self.r_ba, t)}
                for t in thresholds
            },
        }


class ActivationCorrelation:
    """Streams codes of A and B on the same tokens (`add`), then `result`."""

    def __init__(self, m_a: int, m_b: int, device: torch.device | str = "cpu") -> None:
        self.m_a, self.m_b, self.n = m_a, m_b, 0
        zeros = {"dtype": torch.float64, "device": device}
        self.sum_a, self.sq_a = torch.zeros(m_a, **zeros), torch.zeros(m_a, **zeros)
        self.sum_b, self.sq_b = torch.zeros(m_b, **zeros), torch.zeros(m_b, **zeros)
        self.keys = torch.zeros(0, dtype=torch.int64, device=device)
        self.cross = torch.zeros(0, **zeros)
        self.pending: list[tuple[Tensor, Tensor]] = []
        self.pending_size = 0

    def add(self, code_a: SparseCode | Tensor, code_b: SparseCode | Tensor) -> None:
        """Count one batch of tokens: A's and B's codes of the same (n,) tokens."""
        va, ia = active_rows(code_a)
        vb, ib = active_rows(code_b)
        va, vb = va.double(), vb.double()
        self.n += va.shape[0]
        self.sum_a.index_add_(0, ia.reshape(-1), va.reshape(-1))
        self.sq_a.index_add_(0, ia.reshape(-1), va.square().reshape(-1))
        self.sum_b.index_add_(0, ib.reshape(-1), vb.reshape(-1))
        self.sq_b.index_add_(0, ib.reshape(-1), vb.square().reshape(-1))
        rows = max(1, CHUNK_PAIRS // max(va.shape[1] * vb.shape[1], 1))
        for start in range(0, va.shape[0], rows):
            a, b = va[start : start + rows], vb[start : start + rows]
            both = (a > 0)[:, :, None] & (b > 0)[:, None, :]
            keys = ia[start : start + rows, :, None] * self.m_b + ib[start : start + rows, None, :]
            self.pending.append((keys[both], (a[:, :, None] * b[:, None, :])[both]))
            self.pending_size += int(both.sum())
            if self.pending_size >= FLUSH_PAIRS:
                self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        keys = torch.cat([self.keys, *(k for k, _ in self.pending)])
        cross = torch.cat([self.cross, *(c for _, c in self.pending)])
        self.keys, where = torch.unique(keys, return_inverse=True)
        self.cross = torch.zeros(self.keys.numel(), dtype=cross.dtype, device=cross.device)
        self.cross.index_add_(0, where, cross)
        self.pending, self.pending_size = [], 0

    def pair_r(self, a: Tensor, b: Tensor) -> Tensor:
        """(c,) the correlations of pairs (a[i], b[i]) (c,), co-firing or not."""
        self._flush()
        key = a.to(self.keys.device) * self.m_b + b.to(self.keys.device)
        pos = torch.searchsorted(self.keys, key).clamp(max=max(self.keys.numel() - 1, 0))
        found = self.keys[pos] == key if self.keys.numel() else torch.zeros_like(key, dtype=bool)
        cross = torch.where(found, self.cross[pos] if self.keys.numel() else 0.0, 0.0)
        return self._r(key // self.m_b, key % self.m_b, cross).cpu()

    def _r(self, a: Tensor, b: Tensor, cross: Tensor) -> Tensor:
        n = max(self.n, 1)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        var_a = (self.sq_a / n - mean_a.square()).clamp_min(0)
        var_b = (self.sq_b / n - mean_b.square()).clamp_min(0)
        return (cross / n - mean_a[a] * mean_b[b]) / (var_a[a] * var_b[b]).sqrt()

    def result(self) -> Correlations:
        """Each latent's best match by correlation, both ways."""
        self._flush()
        a, b = self.keys // self.m_b, self.keys % self.m_b
        r = self._r(a, b, self.cross)
        ok = torch.isfinite(r) & (r > 0)
        a, b, r = a[ok], b[ok], r[ok]

        def best(row: Tensor, other: Tensor, m: int) -> tuple[Tensor, Tensor]:
            order, rank = rank_within(row, r)
            first = order[rank == 0]
            partner = torch.full((m,), -1, dtype=torch.int64, device=r.device)
            value = torch.full((m,), float("nan"), dtype=r.dtype, device=r.device)
            partner[row[first]], value[row[first]] = other[first], r[first]
            return partner.cpu(), value.cpu()

        best_ab, r_ab = best(a, b, self.m_a)
        best_ba, r_ba = best(b, a, self.m_b)
        return Correlations(best_ab, r_ab, best_ba, r_ba, int(self.keys.numel()))
