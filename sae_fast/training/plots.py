"""PNG plots of a training run: curves from metrics.jsonl and the latent firing histogram."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..files import atomic_path
from .checkpoints import METRICS_FILE
from .metrics import read_jsonl

_CURVES = (
    ("fvu", "FVU", True),
    ("mse", "MSE (raw units)", True),
    ("l0", "L0 (active latents / token)", False),
    ("dead_fraction", "dead latent fraction", False),
    ("auxk", "AuxK loss", True),
    ("l1", "L1 penalty", True),
    ("l0_penalty", "L0 penalty", True),
    ("lr", "learning rate", False),
    ("tokens_per_s", "tokens / s", False),
)


def save_figure(fig, path: str | Path) -> Path:
    """fig as a PNG at path, written atomically (reports embed these files), then closed."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    pyplot().close(fig)
    return Path(path)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """One panel per metric present in rows (metrics.jsonl lines) against the step."""
    plt = pyplot()
    panels = [c for c in _CURVES if any(c[0] in r for r in rows)]
    cols = 3
    fig, axes = plt.subplots(
        -(-len(panels) // cols), cols, figsize=(12, 3 * -(-len(panels) // cols)), squeeze=False
    )
    for ax, (key, label, log) in zip(axes.flat, panels, strict=False):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(label)
        ax.set_xlabel("step")
        if log and all(p[1] > 0 for p in pts):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def firing_histogram(frequencies: Tensor, path: str | Path, title: str = "") -> Path:
    """Histogram of log10 firing frequency per latent; latents that never fired counted apart."""
    plt = pyplot()
    freq = frequencies.detach().double().cpu()
    never = int((freq == 0).sum())
    fig, ax = plt.subplots(figsize=(6, 4))
    if never < freq.numel():
        ax.hist(torch.log10(freq[freq > 0]).numpy(), bins=50)
    ax.set_xlabel("log10 firing frequency (fraction of tokens)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title} ({never} of {freq.numel()} latents never fired)".strip())
    fig.tight_layout()
    return save_figure(fig, path)


def plot_run(run_dir: str | Path, frequencies: Tensor) -> list[Path]:
    """training_curves.png and firing_frequency.png in run_dir from its metrics.jsonl."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / METRICS_FILE)
    return [
        training_curves(rows, run_dir / "training_curves.png", run_dir.name),
        firing_histogram(frequencies, run_dir / "firing_frequency.png", run_dir.name),
    ]
