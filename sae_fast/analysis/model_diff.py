"""Model diffing with a crosscoder: which latents belong to one source (one model, one hook
point), which are shared, read from the decoder norms (Lindsey et al. 2024, "Sparse
crosscoders"; Minder et al. 2025).

A crosscoder (training/crosscoder_trainer.py) is an SAE over its sources side by side; its
provenance's "crosscoder" names them, their widths and the scales that brought each to one
mean norm while it trained. Latent j's decoder to source s is W_dec[j, columns of s]; its
norm is read in those common units (times the source's scale: a model whose activations are
three times larger does not own its latents for that), and its share of s is that norm over
the sum of the latent's norms to every source. With two models on the same hook point, a
latent the second model alone uses has share near 1 of it (relative norm near 1), one the
first alone uses near 0, and a shared one near 1/2, where the cosine of its two decoders says
whether it writes the same direction in both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..sae import SparseAutoencoder

HISTOGRAM_BINS = 20


class NotACrosscoderError(ValueError):
    """The SAE records no crosscoder sources."""


def crosscoder_sources(sae: SparseAutoencoder) -> tuple[list[str], list[int], list[float]]:
    """(source names, widths, training scales) that sae's provenance records;
    NotACrosscoderError unless they tile its d_in."""
    found = sae.provenance.get("crosscoder")
    found = found if isinstance(found, dict) else {}
    names, widths, scales = found.get("sources"), found.get("widths"), found.get("scales")
    ok = isinstance(names, list) and isinstance(widths, list) and len(names) == len(widths) > 1
    ok = ok and all(isinstance(w, int) and w > 0 for w in widths) and sum(widths) == sae.d_in
    scales = [1.0] * len(widths) if ok and scales is None else scales
    ok = ok and isinstance(scales, list) and len(scales) == len(widths)
    if not ok or not all(isinstance(s, (int, float)) and s > 0 for s in scales):
        raise NotACrosscoderError(
            "it records no crosscoder sources (provenance.crosscoder: sources and widths that "
            f"tile d_in={sae.d_in}); train one with `sae-fast train --crosscoder`"
        )
    return names, widths, scales


@torch.no_grad()
def decoder_norms(sae: SparseAutoencoder, widths: list[int], scales: list[float]) -> Tensor:
    """(m, S) float64: each latent's decoder norm per source, in the units it trained in."""
    parts = sae.W_dec.detach().double().split(widths, dim=1)
    return torch.stack([part.norm(dim=1) * s for part, s in zip(parts, scales, strict=True)], 1)


def diff_report(sae: SparseAutoencoder, top: int = 20, specific: float = 0.9) -> dict:
    """The model-diffing report of crosscoder sae: per source, its specific latents (share at
    least `specific`), the rest shared; a histogram of the last source's share (the relative
    norm, with two sources); each source's top latents by share; with two sources of one
    width, the decoder cosine of the shared latents."""
    if not 0.5 < specific <= 1:
        raise ValueError(f"specific must be in (0.5, 1], got {specific}")
    names, widths, scales = crosscoder_sources(sae)
    norms = decoder_norms(sae, widths, scales)
    total = norms.sum(dim=1)
    share = norms / torch.where(total > 0, total, torch.ones_like(total))[:, None]
    owner = torch.where(share.max(dim=1).values >= specific, share.argmax(dim=1), -1)
    relative = share[:, -1]
    histogram = torch.histc(relative, bins=HISTOGRAM_BINS, min=0, max=1)
    report = {
        "sources": names,
        "n_latents": sae.n_latents,
        "specific_threshold": specific,
        "specific": {name: int((owner == s).sum()) for s, name in enumerate(names)},
        "shared": int((owner == -1).sum()),
        "relative_norm_of": names[-1],
        "histogram": {"bins": HISTOGRAM_BINS, "counts": [int(c) for c in histogram]},
        "top": {},
    }
    for s, name in enumerate(names):
        order = share[:, s].argsort(descending=True)[:top]
        report["top"][name] = [
            {"latent": int(j), "share": float(share[j, s]), "norms": norms[j].tolist()}
            for j in order
        ]
    if len(widths) == 2 and widths[0] == widths[1]:
        a, b = sae.W_dec.detach().double().split(widths, dim=1)  # (a cosine has no units)
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
        shared = cosine[owner == -1]
        report["shared_cosine_median"] = float(shared.median()) if shared.numel() else None
    return report


def report_markdown(report: dict) -> str:
    """The report as a short markdown page."""
    names = report["sources"]
    lines = [
        "# Model diffing",
        "",
        f"{report['n_latents']} latents over {', '.join(names)}. A latent belongs to a source "
        f"when at least {report['specific_threshold']:.0%} of its decoder norm is that "
        "source's.",
        "",
        "| | latents |",
        "|---|---|",
        *(f"| only {name} | {count} |" for name, count in report["specific"].items()),
        f"| shared | {report['shared']} |",
    ]
    if report.get("shared_cosine_median") is not None:
        median = report["shared_cosine_median"]
        lines += ["", f"Median decoder cosine of the shared latents: {median:.3f}."]
    for name, rows in report["top"].items():
        lines += ["", f"## The latents most specific to {name}", "", "| latent | share |"]
        lines += ["|---|---|", *(f"| {r['latent']} | {r['share']:.3f} |" for r in rows)]
    return "\n".join(lines) + "\n"


def plot_relative_norms(report: dict, path: str | Path) -> Path:
    """The histogram of the last source's share of each latent's decoder norm, as a PNG."""
    from ..training.plots import pyplot, save_figure

    counts = report["histogram"]["counts"]
    edges = torch.linspace(0, 1, len(counts) + 1)
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.bar(edges[:-1].tolist(), counts, width=1 / len(counts), align="edge", edgecolor="white")
    ax.set_xlabel(f"relative decoder norm: share of {report['relative_norm_of']}")
    ax.set_ylabel("latents")
    ax.set_title("Model diffing: " + " vs ".join(report["sources"]))
    fig.tight_layout()
    return save_figure(fig, path)
