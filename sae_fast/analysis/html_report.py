"""A single-file HTML report of a run: metrics, training plots and feature contexts."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_path
from .dashboard_html import feature_href

_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
.ctx { font-family: monospace; white-space: pre-wrap; }
.hit { background: #f6b26b; font-weight: bold; }
img { max-width: 100%; }
"""


@dataclass
class FeatureCard:
    """One latent: its index, firing frequency and top contexts (value, left, token, right)."""

    latent: int
    frequency: float
    contexts: list[tuple[float, str, str, str]]


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def _table(rows: dict) -> str:
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in rows.items()
    )
    return f"<table>{body}</table>"


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _card(card: FeatureCard, corpus: str, dashboard: str | None) -> str:
    name = str(card.latent)
    if dashboard is not None:
        name = f"<a href='{feature_href(dashboard, card.latent)}'>{name}</a>"
    lines = "".join(
        f"<tr><td>{value:.3f}</td><td class='ctx'>{html.escape(left)} "
        f"<span class='hit'>{html.escape(token)}</span> {html.escape(right)}</td></tr>"
        for value, left, token, right in card.contexts
    )
    return (
        f"<h3>latent {name}</h3><p>fires on {100 * card.frequency:.2f}% of "
        f"{html.escape(corpus)}</p><table><tr><th>activation</th><th>context</th></tr>"
        f"{lines}</table>"
    )


def write_report(
    path: str | Path,
    title: str,
    summary: dict,
    images: list[Path],
    cards: list[FeatureCard],
    *,
    corpus: str = "held-out tokens",
    notes: list[str] | tuple[str, ...] = (),
    dashboard: str | None = None,
) -> Path:
    """Write the report to path atomically (PNG images embedded, so the file stands alone).

    corpus names the tokens the cards' contexts and frequencies come from; notes are
    paragraphs shown under the title; dashboard, a feature dashboard folder relative to the
    report, which the features section and each card link to. Without cards there is no
    features section.
    """
    features = [f"<h2>Features: the {html.escape(corpus)} that activate them most</h2>"]
    if dashboard is not None:
        features.append(
            f"<p>Every feature, with its examples, histogram and neighbours: the <a href="
            f"'{html.escape(dashboard, quote=True)}/index.html'>feature dashboard</a>.</p>"
        )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        *(f"<p>{html.escape(note)}</p>" for note in notes),
        "<h2>Summary</h2>",
        _table(summary),
        "<h2>Training</h2>",
        *(_image(p) for p in images),
        *(features if cards else []),
        *(_card(c, corpus, dashboard) for c in cards),
        "</body></html>",
    ]
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")  # as its meta charset says
    return path
