"""Matching the features of two SAEs by decoder direction, without an (m_a, m_b) matrix.

The cosine of decoder rows a and b measures whether two latents write the same direction.
Both SAEs' unit rows are compared in blocks of A's rows, each block against all of B: every
A row keeps its best B row and its CANDIDATES best, every B row its best A row so far, so
memory stays at one block (BLOCK_ELEMENTS cosines, `cosine_blocks`) for any width; the
dashboards' nearest features come from the same blocks (`nearest_rows`). The one-to-one
assignment is greedy: candidate pairs in descending cosine, each taken when both sides are
still free (near the optimum when the best matches are clear; a feature whose candidates were
all taken stays unassigned).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

BLOCK_ELEMENTS = 1 << 26  # cosines per block: 256 MiB in float32
CANDIDATES = 8  # per A row, for the one-to-one assignment
THRESHOLDS = (0.5, 0.7, 0.9)


@dataclass
class Matches:
    """best_ab (m_a,): the index in B of each A row's best match, cos_ab its cosine; best_ba,
    cos_ba the same from B; pair_b (m_a,): A row i's one-to-one partner (-1: none),
    pair_cos its cosine (nan: none)."""

    best_ab: Tensor
    cos_ab: Tensor
    best_ba: Tensor
    cos_ba: Tensor
    pair_b: Tensor
    pair_cos: Tensor

    def summary(self, top: int = 10) -> dict:
        """Fractions above THRESHOLDS each way and one to one, and the best and worst pairs."""
        assigned = self.pair_b >= 0

        def above(cos: Tensor, t: float) -> float:
            return (cos > t).double().mean().item()

        order = torch.argsort(self.cos_ab, descending=True)
        rows = [
            {"a": i, "b": int(self.best_ab[i]), "cosine": self.cos_ab[i].item(),
             "mutual": int(self.best_ba[self.best_ab[i]]) == i}
            for i in order.tolist()
        ]  # fmt: skip
        return {
            "n_latents_a": self.cos_ab.numel(),
            "n_latents_b": self.cos_ba.numel(),
            "mean_best_cosine_a_to_b": self.cos_ab.mean().item(),
            "mean_best_cosine_b_to_a": self.cos_ba.mean().item(),
            "mutual_best_fraction": sum(r["mutual"] for r in rows) / max(len(rows), 1),
            "one_to_one_assigned": int(assigned.sum()),
            "one_to_one_mean_cosine": self.pair_cos[assigned].mean().item(),
            "shared": {
                str(t): {
                    "a_to_b": above(self.cos_ab, t),
                    "b_to_a": above(self.cos_ba, t),
                    "one_to_one": above(torch.nan_to_num(self.pair_cos, nan=-1.0), t),
                }
                for t in THRESHOLDS
            },
            "best": rows[:top],
            "worst": rows[::-1][:top],
        }


# The training options that fix an SAE's initial weights, besides its shape.
INIT_OPTIONS = ("seed", "activation", "dtype", "b_dec_init")


def shared_initialisation(a: dict, b: dict, shapes: tuple[tuple, tuple]) -> dict | None:
    """The options two SAEs' provenances (a, b) record alike that gave them the same initial
    weights, or None: decoder rows training left near their start then match across the two
    without being features they share. shapes: each SAE's (d_in, n_latents)."""
    train_a, train_b = (p.get("train") or {} for p in (a, b))
    if shapes[0] != shapes[1] or "seed" not in train_a or "seed" not in train_b:
        return None
    if any(train_a.get(key) != train_b.get(key) for key in INIT_OPTIONS):
        return None
    return {key: train_a.get(key) for key in INIT_OPTIONS}


def unit_rows(W: Tensor) -> Tensor:
    """W (m, d) as float32 rows of norm 1 (zero rows stay zero)."""
    W = W.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cosine_blocks(
    A: Tensor, B: Tensor, block_elements: int = BLOCK_ELEMENTS
) -> Iterator[tuple[int, Tensor]]:
    """(start, A[start : start + rows] @ B.T) over A's rows, rows * len(B) <= block_elements
    (at least one row): the only products held at a time.  A: (m_a, d), B: (m_b, d)."""
    rows = max(1, block_elements // max(B.shape[0], 1))
    for start in range(0, A.shape[0], rows):
        yield start, A[start : start + rows] @ B.T


@torch.no_grad()
def pair_cosines(W_a: Tensor, W_b: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """(c,) the cosines of rows W_a[a[i]] and W_b[b[i]] for index tensors a, b (c,)."""
    rows_a = unit_rows(W_a[a.to(W_a.device)])
    rows_b = unit_rows(W_b[b.to(W_b.device)]).to(rows_a.device)
    return (rows_a * rows_b).sum(1).cpu()


@torch.no_grad()
def nearest_rows(
    W: Tensor, rows: Tensor, count: int, block_elements: int = BLOCK_ELEMENTS
) -> tuple[Tensor, Tensor]:
    """(cosine, index): (s, count) the rows of W (m, d) nearest by cosine to each of W's rows
    `rows` (s,), itself left out, nearest first."""
    unit = unit_rows(W)
    count = min(count, W.shape[0] - 1)
    found_cos = torch.empty(rows.numel(), count, device=unit.device)
    found = torch.empty(rows.numel(), count, dtype=torch.int64, device=unit.device)
    picked = rows.to(unit.device)
    for start, sims in cosine_blocks(unit[picked], unit, block_elements):
        block = picked[start : start + len(sims)]
        sims[torch.arange(len(sims), device=sims.device), block] = -torch.inf  # not itself
        top = sims.topk(count, dim=1)
        found_cos[start : start + len(sims)], found[start : start + len(sims)] = top
    return found_cos.cpu(), found.cpu()


@torch.no_grad()
def match_decoders(W_a: Tensor, W_b: Tensor, block_elements: int = BLOCK_ELEMENTS) -> Matches:
    """Match the rows of W_a (m_a, d) and W_b (m_b, d) by cosine (the module docstring)."""
    if W_a.ndim != 2 or W_b.ndim != 2 or W_a.shape[1] != W_b.shape[1]:
        raise ValueError(
            f"the decoders must be (m, d) of one width, got {tuple(W_a.shape)} and "
            f"{tuple(W_b.shape)}"
        )
    A, B = unit_rows(W_a), unit_rows(W_b.to(W_a.device))
    m_a, m_b = A.shape[0], B.shape[0]
    c = min(CANDIDATES, m_b)
    cand_b = torch.empty(m_a, c, dtype=torch.int64, device=A.device)
    cand_cos = torch.empty(m_a, c, device=A.device)
    cos_ba = torch.full((m_b,), -2.0, device=A.device)
    best_ba = torch.zeros(m_b, dtype=torch.int64, device=A.device)
    for start, sims in cosine_blocks(A, B, block_elements):
        top = sims.topk(c, dim=1)
        cand_cos[start : start + len(sims)], cand_b[start : start + len(sims)] = top
        col = sims.max(dim=0)
        better = col.values > cos_ba
        cos_ba = torch.where(better, col.values, cos_ba)
        best_ba = torch.where(better, col.indices + start, best_ba)
    cand_b, cand_cos = cand_b.cpu(), cand_cos.cpu()
    pair_b, pair_cos = _greedy_pairs(cand_b, cand_cos, m_b)
    # Each A row's first candidate is its best match.
    return Matches(cand_b[:, 0], cand_cos[:, 0], best_ba.cpu(), cos_ba.cpu(), pair_b, pair_cos)


def _greedy_pairs(cand_b: Tensor, cand_cos: Tensor, m_b: int) -> tuple[Tensor, Tensor]:
    """One-to-one pairs from the candidates (m_a, c), in descending cosine."""
    m_a, c = cand_b.shape
    order = torch.argsort(cand_cos.reshape(-1), descending=True, stable=True).tolist()
    flat_b, flat_cos = cand_b.reshape(-1).tolist(), cand_cos.reshape(-1).tolist()
    pair_b = [-1] * m_a
    pair_cos = [float("nan")] * m_a
    taken = [False] * m_b
    for k in order:
        a, b = k // c, flat_b[k]
        if pair_b[a] < 0 and not taken[b]:
            pair_b[a], pair_cos[a], taken[b] = b, flat_cos[k], True
    return torch.tensor(pair_b, dtype=torch.int64), torch.tensor(pair_cos)


def plot_cosines(matches: Matches, path: str | Path, labels: tuple[str, str] = ("A", "B")) -> Path:
    """A PNG histogram of the best-match cosines each way; returns its path."""
    from ..training.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    both = torch.cat([matches.cos_ab, matches.cos_ba]).float()
    # From the lowest cosine (to a tenth) to 1: the matches crowd near 1, not over [-1, 1].
    low = max(-1.0, math.floor(both.min().item() * 10) / 10) if both.numel() else 0.0
    bins = torch.linspace(low, 1, 41).tolist()
    a, b = labels
    # Side by side in each bin: neither side's bars hide the other's.
    ax.hist(
        [matches.cos_ab.tolist(), matches.cos_ba.tolist()],
        bins=bins,
        label=[f"each {a} latent's best in {b}", f"each {b} latent's best in {a}"],
    )
    ax.set_xlabel("decoder cosine of the best match")
    ax.set_ylabel("latents")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
