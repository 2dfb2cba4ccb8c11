"""Feature drift between two corpora: which latents fire more or less often on B than on A.

Each latent's firing frequency on each corpus comes from one evaluation pass (evaluate.py).
A latent moves when a two-proportion z-test of its firing counts c_a / n_a against
c_b / n_b, with the pooled rate p = (c_a + c_b) / (n_a + n_b) and
z = (c_b / n_b - c_a / n_a) / sqrt(p (1 - p) (1 / n_a + 1 / n_b)), rejects equal rates after
the Benjamini-Hochberg correction over all latents at false discovery rate `alpha`; so the
token counts of both corpora set what a difference must be to count. Tokens of one document
are not independent, so the test is read as a screen, not as exact p-values. The overall
score is the Jensen-Shannon divergence (base 2, in [0, 1]) between the latents' shares of all
firings on A and on B: 0 when every latent keeps its share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Drift:
    """tokens_a, tokens_b: the token counts; freq_a, freq_b: (m,) firing frequencies;
    z: (m,) the statistic (positive: fires more on B); q: (m,) the BH-adjusted p-values;
    moved: (m,) bool, q <= alpha; divergence: the overall Jensen-Shannon score."""

    tokens_a: int
    tokens_b: int
    freq_a: Tensor
    freq_b: Tensor
    z: Tensor
    q: Tensor
    moved: Tensor
    divergence: float
    alpha: float

    def movers(self, n: int) -> list[dict]:
        """The n latents that moved most (by |z|), those that moved only: a row each."""
        order = torch.argsort(self.z.abs(), descending=True)
        rows = []
        for i in order[:n].tolist():
            if not bool(self.moved[i]):
                break
            rows.append({
                "latent": i,
                "direction": "appears" if self.z[i] > 0 else "vanishes",
                "freq_a": self.freq_a[i].item(),
                "freq_b": self.freq_b[i].item(),
                "z": self.z[i].item(),
                "q": self.q[i].item(),
            })  # fmt: skip
        return rows

    def summary(self, top: int = 20) -> dict:
        """The JSON report: token counts, the score, how many latents moved, the top movers."""
        return {
            "tokens_a": self.tokens_a,
            "tokens_b": self.tokens_b,
            "alpha": self.alpha,
            "js_divergence": self.divergence,
            "moved_fraction": self.moved.double().mean().item(),
            "appeared": int((self.moved & (self.z > 0)).sum()),
            "vanished": int((self.moved & (self.z < 0)).sum()),
            "top": self.movers(top),
        }


def benjamini_hochberg(p: Tensor) -> Tensor:
    """BH-adjusted p-values (q-values) of p (m,): the smallest FDR at which each is rejected."""
    m = p.numel()
    order = torch.argsort(p)
    ranked = p[order] * m / torch.arange(1, m + 1, dtype=p.dtype)
    # The running minimum from the largest p down keeps the adjusted values monotone.
    adjusted = ranked.flip(0).cummin(0).values.flip(0).clamp(max=1.0)
    q = torch.empty_like(p)
    q[order] = adjusted
    return q


def feature_drift(
    freq_a: Tensor, tokens_a: int, freq_b: Tensor, tokens_b: int, alpha: float = 0.01
) -> Drift:
    """Drift from corpus A to B of latents with firing frequencies freq_a, freq_b (m,) over
    tokens_a and tokens_b tokens (the module docstring has the test and the score)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    fa, fb = freq_a.double().cpu(), freq_b.double().cpu()
    pooled = (fa * tokens_a + fb * tokens_b) / (tokens_a + tokens_b)
    se = (pooled * (1 - pooled) * (1 / tokens_a + 1 / tokens_b)).sqrt()
    z = torch.where(se > 0, (fb - fa) / torch.where(se > 0, se, 1.0), 0.0)
    p = torch.erfc(z.abs() / math.sqrt(2))
    q = benjamini_hochberg(p)
    return Drift(tokens_a, tokens_b, fa, fb, z, q, q <= alpha, js_divergence(fa, fb), alpha)


def js_divergence(a: Tensor, b: Tensor) -> float:
    """Jensen-Shannon divergence, base 2, of the distributions proportional to a and b (m,)."""
    if a.sum() <= 0 or b.sum() <= 0:
        return 0.0 if a.sum() == b.sum() else 1.0
    pa, pb = a / a.sum(), b / b.sum()
    mid = (pa + pb) / 2

    def kl(p: Tensor) -> float:
        keep = p > 0
        return (p[keep] * (p[keep] / mid[keep]).log2()).sum().item()

    return (kl(pa) + kl(pb)) / 2
