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


def reconstruction_sums(x: Tensor, x_hat: Tensor, code: SparseCode | Tensor) -> Tensor:
    """The sums a batch's mse, fvu and l0 come from, in float64, to add up over the batch's
    parts on several processes.  x, x_hat: (n, d); code (n, k) or (n, m) -> (4 + d,):
    tokens, sum ||x - x_hat||^2, sum ||x||^2, active latents, then sum x (d,)."""
    x, x_hat = x.detach(), x_hat.detach()
    f64 = torch.float64  # sums in float64 without float64 copies of the batch
    head = torch.stack([
        torch.tensor(float(x.shape[0]), dtype=f64, device=x.device),
        (x - x_hat).pow(2).sum(dtype=f64),
        x.pow(2).sum(dtype=f64),
        active_latents(code).sum().to(f64),
    ])  # fmt: skip
    return torch.cat([head, x.sum(dim=0, dtype=f64)])


def spread_from_sums(sums: Tensor) -> float:
    """sum ||x - mean(x)||^2 of the batch whose reconstruction_sums (added up) are sums."""
    n = sums[0].item()
    mean = sums[4:] / max(n, 1)
    # sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2, exact enough in float64.
    return sums[2].item() - n * mean.pow(2).sum().item()


def metrics_from_sums(sums: Tensor) -> dict[str, float]:
    """mse, fvu and l0 of the batch whose reconstruction_sums (added up) are sums."""
    n, error, _, active = sums[:4].tolist()
    variance = spread_from_sums(sums)
    return {
        "mse": error / max(n * (sums.numel() - 4), 1),
        "fvu": error / variance if variance > 0 else float("nan"),
        "l0": active / max(n, 1),
    }


def parts_metrics(parts: list[Tensor], scales: list[float]) -> tuple[dict, list[dict]]:
    """A batch cut into parts (a CLT's layers, a crosscoder's sources), each part's
    reconstruction_sums added up over the batch, and each part's training scale ->
    (the whole's mse in raw units, fvu (its error over its variance, as trained) and l0 (the
    parts' mean); per part its fvu, mse in raw units and l0)."""
    per_part = []
    for sums, scale in zip(parts, scales, strict=True):
        found = metrics_from_sums(sums)
        found["mse"] /= scale**2
        per_part.append(found)
    spread = sum(spread_from_sums(sums) for sums in parts)
    error = sum(sums[1].item() for sums in parts)
    raw = sum(sums[1].item() / scale**2 for sums, scale in zip(parts, scales, strict=True))
    elements = sum(sums[0].item() * (sums.numel() - 4) for sums in parts)
    whole = {
        "mse": raw / max(elements, 1),
        "fvu": error / spread if spread > 0 else float("nan"),
        "l0": sum(found["l0"] for found in per_part) / len(per_part),
    }
    return whole, per_part


class LatentStats:
    """Per-latent firing counters over a run; part of a training checkpoint.

    since_fired: tokens since each latent last fired; total: tokens it fired on in the run;
    window: tokens it fired on since the last window_counts().
    """

    COUNTERS = ("since_fired", "total", "window")  # the per-latent tensors, (m,) int64

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

    def window_counts(self, dead_tokens: int, dense_threshold: float) -> Tensor:
        """(2,) float64: how many latents are dead and how many dense, then a new window
        starts (counts, so that latent shards add theirs up)."""
        freq = self.window.float() / max(self.window_tokens, 1)
        dead = self.dead_mask(dead_tokens).sum()
        counts = torch.stack([dead, (freq > dense_threshold).sum()]).double()
        self.window.zero_()
        self.window_tokens = 0
        return counts

    def frequencies(self) -> Tensor:
        """(m,) fraction of the run's tokens each latent fired on."""
        return self.total.double() / max(self.tokens, 1)

    def state_dict(self) -> dict:
        counters = {key: getattr(self, key) for key in self.COUNTERS}
        return {**counters, "tokens": self.tokens, "window_tokens": self.window_tokens}


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
