"""Training and evaluation metrics: reconstruction, L0, latent firing statistics, the JSONL log.

MSE is the mean over elements of (x - x_hat)^2; FVU = ||x - x_hat||^2 / ||x - mean(x)||^2;
L0 the mean number of active latents per token. A latent is dead when it has not fired for
`dead_tokens` tokens (Gao et al. 2024) and dense when it fires on more than a fraction
`dense_threshold` of the tokens since the last log line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .. import reference as ref
from ..files import atomic_path
from ..ops import SparseCode


def firing_counts(code: SparseCode | Tensor, n_latents: int) -> Tensor:
    """Tokens on which each latent is active.  code: (n, k) sparse or (n, m) dense -> (m,) int64."""
    if isinstance(code, SparseCode):
        active = code.indices[code.values.detach() > 0]
        return torch.bincount(active, minlength=n_latents)
    return (code.detach() > 0).sum(dim=0)


def active_latents(code: SparseCode | Tensor) -> Tensor:
    """Active latents per token.  code: (n, k) sparse or (n, m) dense -> (n,) int64."""
    values = code.values if isinstance(code, SparseCode) else code
    return (values.detach() > 0).sum(dim=-1)


def reconstruction_metrics(x: Tensor, x_hat: Tensor, code: SparseCode | Tensor) -> dict[str, float]:
    """mse, fvu and l0 of one batch.  x, x_hat: (n, d); code (n, k) or (n, m)."""
    x, x_hat = x.detach().float(), x_hat.detach().float()
    return {
        "mse": ref.mse(x, x_hat).item(),
        "fvu": ref.fvu(x, x_hat).item(),
        "l0": active_latents(code).float().mean().item(),
    }


class LatentStats:
    """Per-latent firing counters over a run; part of a training checkpoint.

    since_fired: tokens since each latent last fired; total: tokens it fired on in the run;
    window: tokens it fired on since the last reset_window().
    """

    def __init__(self, n_latents: int, device: torch.device | str = "cpu") -> None:
        zeros = torch.zeros(n_latents, dtype=torch.int64, device=device)
        self.since_fired, self.total, self.window = zeros, zeros.clone(), zeros.clone()
        self.tokens = 0
        self.window_tokens = 0

    def update(self, counts: Tensor, n_tokens: int) -> None:
        """counts: (m,) tokens each latent fired on among the n_tokens of a batch."""
        self.since_fired += n_tokens
        self.since_fired[counts > 0] = 0
        self.total += counts
        self.window += counts
        self.tokens += n_tokens
        self.window_tokens += n_tokens

    def dead_mask(self, dead_tokens: int) -> Tensor:
        """(m,) bool: latents silent for at least dead_tokens tokens."""
        return self.since_fired >= dead_tokens

    def window_summary(self, dead_tokens: int, dense_threshold: float) -> dict[str, float]:
        """dead and dense latent fractions, then a new window starts."""
        freq = self.window.float() / max(self.window_tokens, 1)
        summary = {
            "dead_fraction": self.dead_mask(dead_tokens).float().mean().item(),
            "dense_fraction": (freq > dense_threshold).float().mean().item(),
        }
        self.window.zero_()
        self.window_tokens = 0
        return summary

    def frequencies(self) -> Tensor:
        """(m,) fraction of the run's tokens each latent fired on."""
        return self.total.double() / max(self.tokens, 1)

    def state_dict(self) -> dict:
        return {
            "since_fired": self.since_fired,
            "total": self.total,
            "window": self.window,
            "tokens": self.tokens,
            "window_tokens": self.window_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        device = self.since_fired.device
        self.since_fired = state["since_fired"].to(device)
        self.total = state["total"].to(device)
        self.window = state["window"].to(device)
        self.tokens, self.window_tokens = state["tokens"], state["window_tokens"]


class MetricsLog:
    """Append-only JSONL log, one object per line with a "step" field."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Drop lines past step: a resumed run rewrites them, so no step appears twice.

        The kept lines replace the file atomically: a crash leaves the old log or the new one.
        """
        if self.path.exists():
            kept = [row for row in read_jsonl(self.path) if row.get("step", 0) <= step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file; a torn last line (a crash mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
